//! Command-line flags shared by the binaries: the experiment (`worker trace` and
//! `coordinator run` take the same flags with the same defaults and help) and client TLS.

use clap::Args;

use crate::error::Result;
use crate::experiment::{
    Corruption, Direction, Experiment, Metric, NoiseCorruption, TokenRole, Tokens,
};
use crate::kinds::Kind;
use crate::settings::{Correctness, NoiseSpec, SeedMode};

/// `--corruption`, `--kinds`, `--samples`, `--window`, `--noise`, `--replace`, `--seed-mode`,
/// `--seed`, `--correctness`, `--tokens`, `--direction`; the defaults are ROME's. [`ExperimentFlags::experiment`]
/// is the one place they become an [`Experiment`].
#[derive(Debug, Clone, Args)]
pub struct ExperimentFlags {
    /// noise (ROME's: Gaussian noise on the subject's embeddings) or str (symmetric token
    /// replacement: the subject replaced by another fact's of the same relation; needs the
    /// dataset, takes none of --samples, --noise, --replace, --seed-mode, --seed).
    #[arg(long, default_value = "noise")]
    pub corruption: CorruptionName,
    /// What to restore: hidden, mlp, attn (Figure 2); severed_mlp, severed_attn (Figure 3:
    /// the hidden state with the token's MLP or attention outputs frozen at a corrupted
    /// run's values); head (one attention head's output, per head).
    #[arg(long, value_delimiter = ',', default_value = "hidden,mlp,attn")]
    pub kinds: Vec<Kind>,
    /// Noise samples per restored state [default: 10].
    #[arg(long)]
    pub samples: Option<u32>,
    /// Layers restored together for mlp and attn.
    #[arg(long, default_value_t = 10)]
    pub window: u32,
    /// A level (e.g. 0.1), sK (K × the std of the subjects' embeddings; ROME's is s3) or uK
    /// (uniform noise in [-1, 1) × K) [default: s3].
    #[arg(long)]
    pub noise: Option<NoiseSpec>,
    /// Replace the subject's embeddings with the noise instead of adding it.
    #[arg(long)]
    pub replace: bool,
    /// rome: numpy RandomState(1) for every fact, as ROME; per-fact: seeded by --seed and the
    /// fact's id [default: rome].
    #[arg(long)]
    pub seed_mode: Option<SeedMode>,
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
    /// denoising (ROME's: the corrupted run with one clean state restored) or noising (the
    /// clean run with one state replaced by the corrupted run's, per sample).
    #[arg(long, value_enum, default_value = "denoising")]
    pub direction: Direction,
}

impl ExperimentFlags {
    /// The experiment these flags describe, checked (everything that needs no model).
    pub fn experiment(&self) -> Result<Experiment> {
        let refuse = |setting: &str, message: &str| crate::Error::Experiment {
            setting: setting.into(),
            message: message.into(),
        };
        let seed_mode = self.seed_mode.unwrap_or(SeedMode::Rome);
        if self.seed.is_some() && seed_mode == SeedMode::Rome {
            return Err(refuse("--seed", "applies to --seed-mode per-fact only"));
        }
        let corruption = match self.corruption {
            CorruptionName::Noise => Corruption::Noise(NoiseCorruption {
                noise: self.noise.unwrap_or(NoiseSpec::StdMultiple(3.0)),
                replace: self.replace,
                samples: self.samples.unwrap_or(10),
                seed_mode,
                seed: self.seed.unwrap_or(0),
            }),
            CorruptionName::Str => {
                // STR is deterministic: one corrupted run, no noise to draw or seed.
                let given = [
                    ("--samples", self.samples.is_some()),
                    ("--noise", self.noise.is_some()),
                    ("--replace", self.replace),
                    ("--seed-mode", self.seed_mode.is_some()),
                    ("--seed", self.seed.is_some()),
                ];
                if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                    return Err(refuse(
                        flag,
                        "does not apply to --corruption str (one deterministic corrupted run)",
                    ));
                }
                Corruption::Str
            }
        };
        let experiment = Experiment {
            corruption,
            kinds: self.kinds.clone(),
            window: self.window,
            tokens: Tokens(self.tokens.clone()),
            correctness: self.correctness,
            direction: self.direction,
            metrics: Metric::ALL.to_vec(),
        };
        experiment.check()?;
        Ok(experiment)
    }
}

/// The corruptions `--corruption` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CorruptionName {
    /// Gaussian (or uniform) noise on the subject's embeddings.
    Noise,
    /// Symmetric token replacement.
    Str,
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        experiment: ExperimentFlags,
    }

    fn parse(args: &[&str]) -> Result<Experiment> {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .expect("clap parses");
        cli.experiment.experiment()
    }

    #[test]
    fn defaults_are_romes_and_str_takes_no_noise_settings() {
        assert_eq!(parse(&[]).expect("defaults"), Experiment::rome());
        let str = parse(&["--corruption", "str", "--kinds", "hidden"]).expect("str");
        assert_eq!(str.corruption, Corruption::Str);
        assert_eq!(str.samples(), 1);
        for flags in [
            &["--samples", "3"][..],
            &["--noise", "0.1"],
            &["--replace"],
            &["--seed-mode", "per-fact"],
            &["--seed-mode", "per-fact", "--seed", "2"],
        ] {
            let mut args = vec!["--corruption", "str"];
            args.extend_from_slice(flags);
            let err = parse(&args).expect_err("refused").to_string();
            assert!(err.starts_with(flags[0]) && err.contains("--corruption str"), "{err}");
        }
        let err = parse(&["--seed", "3"]).expect_err("rome mode").to_string();
        assert!(err.starts_with("--seed"), "{err}");
    }

    #[test]
    fn direction_is_a_flag_and_changes_the_digest() {
        let noising = parse(&["--direction", "noising"]).expect("noising");
        assert_eq!(noising.direction, Direction::Noising);
        assert_eq!(parse(&["--direction", "denoising"]).expect("d"), Experiment::rome());
        assert_ne!(noising.digest(), Experiment::rome().digest());
        assert_eq!(noising.metrics, Metric::ALL);
        // ROME's second draw belongs to its denoising notebook only.
        let kinds = ["--kinds", "hidden,severed_mlp"];
        assert!(parse(&kinds).expect("severed").two_draws());
        let mut args = kinds.to_vec();
        args.extend(["--direction", "noising"]);
        assert!(!parse(&args).expect("severed noising").two_draws());
        assert!(Cli::try_parse_from(["x", "--direction", "sideways"]).is_err());
    }
}
