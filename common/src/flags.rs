//! Command-line flags shared by the binaries: the experiment (`worker trace` and
//! `coordinator run` take the same flags with the same defaults and help) and client TLS.

use clap::Args;

use crate::error::Result;
use crate::experiment::{
    Corruption, Direction, Experiment, Metric, NoiseCorruption, TokenRole, Tokens,
};
use crate::kinds::Kind;
use crate::settings::{Correctness, NoiseSpec, SeedMode};

/// `--kinds`, `--samples`, `--window`, `--noise`, `--replace`, `--seed-mode`, `--seed`,
/// `--correctness`, `--tokens`; the defaults are ROME's. [`ExperimentFlags::experiment`]
/// is the one place they become an [`Experiment`].
#[derive(Debug, Clone, Args)]
pub struct ExperimentFlags {
    /// What to restore: hidden, mlp, attn (Figure 2); severed_mlp, severed_attn (Figure 3:
    /// the hidden state with the token's MLP or attention outputs frozen at a corrupted
    /// run's values); head (one attention head's output, per head).
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
    /// The sweep seed for --seed-mode per-fact (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Which facts are traced: first-token (the answer is the attribute's first token),
    /// strict (ROME's: the decoded answer equals the attribute) or none (every fact).
    #[arg(long, default_value = "first-token")]
    pub correctness: Correctness,
    /// Which tokens' rows to compute: all, or some of first-subject, middle-subject,
    /// last-subject, first-subsequent, further, last (ROME's Figure 3 notebook computes only
    /// last-subject).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub tokens: Vec<TokenRole>,
}

impl ExperimentFlags {
    /// The experiment these flags describe, checked (everything that needs no model).
    pub fn experiment(&self) -> Result<Experiment> {
        if self.seed.is_some() && self.seed_mode == SeedMode::Rome {
            return Err(crate::Error::Experiment {
                setting: "--seed".into(),
                message: "applies to --seed-mode per-fact only".into(),
            });
        }
        let experiment = Experiment {
            corruption: Corruption::Noise(NoiseCorruption {
                noise: self.noise,
                replace: self.replace,
                samples: self.samples,
                seed_mode: self.seed_mode,
                seed: self.seed.unwrap_or(0),
            }),
            kinds: self.kinds.clone(),
            window: self.window,
            tokens: Tokens(self.tokens.clone()),
            correctness: self.correctness,
            direction: Direction::Denoise,
            metrics: vec![Metric::Prob],
        };
        experiment.check()?;
        Ok(experiment)
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
