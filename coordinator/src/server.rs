//! The gRPC server: the coordinator service (behind the token check) and the standard
//! health service.

use proto::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::service::Service;

/// The server, with TLS when configured. Building it checks the certificate and key, so
/// call it before anything else starts.
pub fn builder(
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> anyhow::Result<tonic::transport::Server> {
    let builder = tonic::transport::Server::builder();
    match tls {
        None => Ok(builder),
        Some(tls) => {
            builder.tls_config(tls).map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key: {e}"))
        }
    }
}

/// Serves until `stop` turns true.
pub async fn serve_grpc(
    mut builder: tonic::transport::Server,
    listener: TcpListener,
    service: Service,
    token: Option<proto::auth::Token>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<CoordinatorServer<Service>>().await;
    let coordinator = CoordinatorServer::new(service)
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
    // Every coordinator RPC needs the token; health stays open for kubelet's probes.
    let coordinator = tonic::service::interceptor::InterceptedService::new(
        coordinator,
        proto::auth::RequireToken(token),
    );
    let result = builder
        .add_service(health)
        .add_service(coordinator)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!("gRPC server: {e}");
    }
}
