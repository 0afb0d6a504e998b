//! The shared bearer token every coordinator RPC requires when one is configured.
//!
//! The token comes from a file (a mounted Kubernetes Secret) or the `CT_TOKEN` environment
//! variable (a Secret as env), never from a command-line flag, so it shows in no `ps`
//! listing; nothing here logs it. The health service stays open: kubelet's gRPC probes
//! cannot send headers, and it reveals nothing about the sweep.

use std::path::Path;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The environment variable that holds the token itself.
pub const TOKEN_ENV: &str = "CT_TOKEN";

/// Why a token could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("--token-file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The token is empty or has characters an HTTP header cannot carry.
    #[error("the token from {from} {why}")]
    Invalid {
        /// Where it came from.
        from: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// A bearer token, kept as the header value it travels in.
#[derive(Clone)]
pub struct Token {
    header: MetadataValue<Ascii>,
    digest: blake3::Hash,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Parses a token; surrounding white space (a file's trailing newline) is dropped.
    pub fn parse(raw: &str, from: &str) -> Result<Self, TokenError> {
        let token = raw.trim();
        let invalid = |why| TokenError::Invalid { from: from.to_string(), why };
        if token.is_empty() {
            return Err(invalid("is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("must be printable ASCII without spaces"));
        }
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| invalid("cannot be sent as an HTTP header"))?;
        Ok(Self { header, digest: blake3::hash(token.as_bytes()) })
    }

    /// The token from `file` if given, else from `$CT_TOKEN` if set, else none.
    pub fn configured(file: Option<&Path>) -> Result<Option<Self>, TokenError> {
        if let Some(path) = file {
            let raw = std::fs::read_to_string(path)
                .map_err(|source| TokenError::Read { path: path.display().to_string(), source })?;
            return Self::parse(&raw, &format!("--token-file {}", path.display())).map(Some);
        }
        match std::env::var(TOKEN_ENV) {
            Ok(raw) => Self::parse(&raw, &format!("${TOKEN_ENV}")).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Whether `header` (an `authorization` value) carries this token. Compares digests,
    /// whose equality is constant-time, so timing does not leak the token.
    fn accepts(&self, header: &[u8]) -> bool {
        header
            .strip_prefix(b"Bearer ")
            .is_some_and(|presented| blake3::hash(presented.trim_ascii()) == self.digest)
    }
}

/// Server side: refuses requests without the token (when one is configured).
#[derive(Clone, Debug)]
pub struct RequireToken(pub Option<Token>);

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else { return Ok(request) };
        match request.metadata().get("authorization") {
            None => Err(Status::unauthenticated("this coordinator requires a token (CT_TOKEN)")),
            Some(v) if token.accepts(v.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong token")),
        }
    }
}

/// Client side: sends the token (when one is configured) with every request.
#[derive(Clone, Debug)]
pub struct SendToken(pub Option<Token>);

impl Interceptor for SendToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("authorization", token.header.clone());
        }
        Ok(request)
    }
}

/// A coordinator client that sends the token.
pub type Client = crate::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, SendToken>,
>;

/// Wraps `channel` in a client that sends `token`, with the protocol's message limits.
pub fn client(channel: tonic::transport::Channel, token: Option<Token>) -> Client {
    crate::coordinator_client::CoordinatorClient::with_interceptor(channel, SendToken(token))
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(server: &mut RequireToken, client: &mut SendToken) -> Result<(), Status> {
        let request = client.call(Request::new(()))?;
        server.call(request).map(|_| ())
    }

    #[test]
    fn only_the_right_token_passes() {
        let token = Token::parse("s3cret\n", "test").expect("token");
        let mut server = RequireToken(Some(token.clone()));
        assert!(ask(&mut server, &mut SendToken(Some(token))).is_ok());
        let none = ask(&mut server, &mut SendToken(None)).expect_err("no token");
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
        assert!(none.message().contains("requires a token"), "{none:?}");
        let wrong = Token::parse("s3cret2", "test").expect("token");
        let refused = ask(&mut server, &mut SendToken(Some(wrong))).expect_err("wrong token");
        assert_eq!(refused.message(), "wrong token");
        // Without a configured token every request passes.
        assert!(ask(&mut RequireToken(None), &mut SendToken(None)).is_ok());
    }

    #[test]
    fn bad_tokens_are_named_and_never_printed() {
        let empty = Token::parse(" \n", "--token-file t").expect_err("empty");
        assert_eq!(empty.to_string(), "the token from --token-file t is empty");
        assert!(Token::parse("two words", "x").is_err());
        let token = Token::parse("hunter2", "x").expect("token");
        assert!(!format!("{token:?}").contains("hunter2"));
    }
}
