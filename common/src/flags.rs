//! The trace settings as command-line flags, shared by `worker trace` and `coordinator run`
//! so that both commands take the same flags with the same defaults and help.

use clap::Args;

use crate::settings::{Correctness, Kind, NoiseSpec, SeedMode};

/// `--kinds`, `--samples`, `--window`, `--noise`, `--replace`, `--seed-mode`, `--seed`,
/// `--correctness`; the defaults are ROME's.
#[derive(Debug, Clone, Args)]
pub struct TraceFlags {
    /// Which states to restore: hidden, mlp, attn.
    #[arg(long, value_delimiter = ',', default_value = "hidden,mlp,attn")]
    pub kinds: Vec<Kind>,
    /// Noise samples per restored state.
    #[arg(long, default_value_t = 10)]
    pub samples: u32,
    /// Layers restored together for mlp and attn.
    #[arg(long, default_value_t = 10)]
    pub window: u32,
    /// A level (e.g. 0.1), sK (K × the std of the subjects' embeddings; ROME's is s3) or uK
    /// (uniform noise in [-1, 1) × K).
    #[arg(long, default_value = "s3")]
    pub noise: NoiseSpec,
    /// Replace the subject's embeddings with the noise instead of adding it.
    #[arg(long)]
    pub replace: bool,
    /// rome: numpy RandomState(1) for every fact, as ROME; per-fact: seeded by --seed and the
    /// fact's id.
    #[arg(long, default_value = "rome")]
    pub seed_mode: SeedMode,
    /// The sweep seed for --seed-mode per-fact.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Which facts are traced: first-token (the answer is the attribute's first token),
    /// strict (ROME's: the decoded answer equals the attribute) or none (every fact).
    #[arg(long, default_value = "first-token")]
    pub correctness: Correctness,
}

impl TraceFlags {
    /// The checks that need no model: at least one kind, sample and layer per window.
    pub fn check(&self) -> Result<(), String> {
        if self.samples == 0 {
            return Err("--samples must be at least 1".into());
        }
        if self.window == 0 {
            return Err("--window must be at least 1".into());
        }
        if self.kinds.is_empty() {
            return Err("--kinds needs at least one of hidden, mlp, attn".into());
        }
        Ok(())
    }
}

/// The client side of TLS, for an `https://` coordinator URL (`worker serve`,
/// `coordinator status`).
#[derive(Debug, Clone, Default, Args)]
pub struct ClientTlsFlags {
    /// The CA that issued the coordinator's certificate (PEM; default: the public web roots).
    #[arg(long, env = "CT_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// This side's certificate, for a coordinator that demands one (mTLS; PEM).
    #[arg(long, env = "CT_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "CT_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ClientTlsFlags {
    /// The CA, certificate and key files, as given.
    pub fn paths(
        &self,
    ) -> (Option<&std::path::Path>, Option<&std::path::Path>, Option<&std::path::Path>) {
        (self.tls_ca.as_deref(), self.tls_cert.as_deref(), self.tls_key.as_deref())
    }
}
