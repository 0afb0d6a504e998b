//! How a `config.json` describes RoPE: transformers 4's fields (`rope_theta`,
//! `rope_scaling`) or transformers 5's (`rope_parameters`, possibly nested per layer type),
//! resolved into a base, a scaling (`super::rope::RopeScaling`) and a rotated fraction, with
//! transformers' defaults (`standardize_rope_params`) and an error naming the field for
//! anything not implemented.

use serde_json::Value;

use super::rope::RopeScaling;
use crate::error::{Error, Result};

/// The names the implemented `rope_type`s go by.
const IMPLEMENTED: &str = "default, linear, llama3, yarn, longrope, dynamic";

/// The RoPE fields of a `config.json`, as a family's `RawConfig` read them. Families whose
/// transformers config renames a field pass it here under its generic name (GPT-NeoX's
/// `rotary_emb_base` as `rope_theta`, `rotary_pct` as `partial_rotary_factor`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RopeFields<'a> {
    /// transformers 4's top-level base; transformers 5 keeps it in `rope_parameters`.
    pub rope_theta: Option<f64>,
    /// transformers 4's scaling description.
    pub rope_scaling: Option<&'a Value>,
    /// transformers 5's description, possibly nested per layer type.
    pub rope_parameters: Option<&'a Value>,
    /// Top-level fraction of each head that is rotated.
    pub partial_rotary_factor: Option<f64>,
    /// The config's `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// Top-level pre-training length (Phi-3 keeps it outside `rope_scaling`; it wins then).
    pub original_max_position_embeddings: Option<usize>,
    /// The per-head width, when known, to check LongRoPE's factor lists against.
    pub head_dim: Option<usize>,
}

/// RoPE as a config describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// The base.
    pub theta: f32,
    /// The scaling.
    pub scaling: RopeScaling,
    /// Fraction of each head that is rotated, when the config gives one.
    pub partial_rotary_factor: Option<f64>,
}

impl RopeConfig {
    /// The rotated width of a head of `head_dim`: `int(head_dim * partial_rotary_factor)`.
    pub fn rotary_dim(&self, head_dim: usize) -> usize {
        rotary_dim(head_dim, self.partial_rotary_factor)
    }
}

/// `int(head_dim * partial_rotary_factor)`, as transformers truncates it.
pub fn rotary_dim(head_dim: usize, partial_rotary_factor: Option<f64>) -> usize {
    match partial_rotary_factor {
        Some(f) => (head_dim as f64 * f) as usize,
        None => head_dim,
    }
}

/// Reads a model's RoPE from transformers 4 fields (`rope_theta`, `rope_scaling`) or
/// transformers 5 ones (`rope_parameters`), resolving defaults as transformers'
/// `standardize_rope_params` and the `ROPE_INIT_FUNCTIONS` do. `layer_type` picks one entry of
/// a `rope_parameters` nested per layer type (Gemma 3's `full_attention`,
/// `sliding_attention`); a flat description applies to every layer type. `source` names
/// config.json in errors.
pub fn rope_from_config(
    fields: &RopeFields<'_>,
    layer_type: Option<&str>,
    source: &str,
) -> Result<RopeConfig> {
    let err = |field: &str, message: String| Error::Config {
        source_name: source.to_string(),
        field: field.to_string(),
        message,
    };
    // transformers 5's `convert_rope_params_to_dict`: `rope_scaling or rope_parameters`.
    let non_empty = |v: &&Value| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty());
    let (root_name, root) = match (fields.rope_scaling.filter(non_empty), fields.rope_parameters) {
        (Some(s), _) => ("rope_scaling", Some(s)),
        (None, p) => ("rope_parameters", p.filter(non_empty)),
    };
    if let Some(r) = root.filter(|r| !r.is_object()) {
        return Err(err(root_name, format!("{r} is not an object")));
    }
    // Nested per layer type when an entry is itself an object: RoPE parameters never are.
    let nested =
        root.is_some_and(|r| r.as_object().is_some_and(|o| o.values().any(Value::is_object)));
    let (name, params) = match (nested, layer_type) {
        (true, Some(key)) => {
            let name = format!("{root_name}.{key}");
            match root.and_then(|r| r.get(key)) {
                Some(v) if v.is_object() => (name, Some(v)),
                Some(Value::Null) => {
                    return Err(err(&name, "null: layers without RoPE are not implemented".into()));
                }
                Some(v) => return Err(err(&name, format!("{v} is not an object"))),
                None => return Err(err(&name, "missing".into())),
            }
        }
        (true, None) => {
            let keys: Vec<&String> = root.and_then(Value::as_object).map_or(Vec::new(), |o| {
                o.iter().filter(|(_, v)| v.is_object()).map(|(k, _)| k).collect()
            });
            return Err(err(
                root_name,
                format!("nested per layer type ({keys:?}); this family has no layer types"),
            ));
        }
        (false, _) => (root_name.to_string(), root),
    };
    let field = |key: &str| format!("{name}.{key}");
    let get = |key: &str| params.and_then(|p| p.get(key)).filter(|v| !v.is_null());
    let num = |key: &str| -> Result<Option<f64>> {
        match get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| err(&field(key), format!("{v} is not a number")))
            }
        }
    };
    let kind = match get("rope_type").or_else(|| get("type")) {
        None => "default",
        Some(v) => {
            v.as_str().ok_or_else(|| err(&field("rope_type"), format!("{v} is not a string")))?
        }
    };
    let required = |key: &str| -> Result<f64> {
        num(key)?.ok_or_else(|| err(&field(key), format!("missing; rope_type {kind:?} needs it")))
    };
    // A value inside the description wins over the top-level one, as `setdefault` has it.
    let (theta_field, theta) = match num("rope_theta")? {
        Some(t) => (field("rope_theta"), t),
        None => ("rope_theta".to_string(), fields.rope_theta.unwrap_or(10000.0)),
    };
    if !(theta > 1.0 && theta.is_finite()) {
        return Err(err(&theta_field, format!("{theta} is not a base above 1")));
    }
    let (partial_field, partial_rotary_factor) = match num("partial_rotary_factor")? {
        Some(f) => (field("partial_rotary_factor"), Some(f)),
        None => ("partial_rotary_factor".to_string(), fields.partial_rotary_factor),
    };
    if let Some(f) = partial_rotary_factor.filter(|f| !(*f > 0.0 && *f <= 1.0)) {
        return Err(err(&partial_field, format!("{f} is not in (0, 1]")));
    }
    let max_positions = fields.max_position_embeddings as f64;
    // `standardize_rope_params`: a top-level value wins for a flat description (Phi-3), the
    // nested one's own value otherwise; `max_position_embeddings` when there is none.
    let original = || -> Result<f64> {
        let top = fields.original_max_position_embeddings.filter(|_| !nested).map(|v| v as f64);
        let value = top.or(num("original_max_position_embeddings")?).unwrap_or(max_positions);
        if value < 1.0 {
            return Err(err(&field("original_max_position_embeddings"), format!("{value} < 1")));
        }
        Ok(value)
    };
    let at_least_one = |key: &str, v: f64| -> Result<f64> {
        if v >= 1.0 && v.is_finite() {
            Ok(v)
        } else {
            Err(err(&field(key), format!("{v} is not a factor >= 1")))
        }
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: required("factor")? as f32 },
        "llama3" => RopeScaling::Llama3 {
            factor: required("factor")? as f32,
            low_freq_factor: required("low_freq_factor")? as f32,
            high_freq_factor: required("high_freq_factor")? as f32,
            original_max_position_embeddings: original()? as f32,
        },
        "yarn" => {
            let original = original()?;
            // The key is required; a null value means the ratio of the two lengths.
            if params.and_then(|p| p.get("factor")).is_none() {
                return Err(err(&field("factor"), "missing; rope_type \"yarn\" needs it".into()));
            }
            let factor = num("factor")?.unwrap_or(max_positions / original);
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 }
            };
            // Python truthiness: 0 and null both mean "not given".
            let truthy = |key: &str| -> Result<Option<f64>> { Ok(num(key)?.filter(|v| *v != 0.0)) };
            let attention_factor =
                match (num("attention_factor")?, truthy("mscale")?, truthy("mscale_all_dim")?) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(m_all)) => mscale(factor, m) / mscale(factor, m_all),
                    (None, _, _) => mscale(factor, 1.0),
                };
            // transformers reads `truncate` from the top-level dict (not a nested entry);
            // absent means true, null is falsy.
            let truncate = match root.and_then(|r| r.get("truncate")) {
                None => true,
                Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(err(&field("truncate"), format!("{v} is not a boolean"))),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: truthy("beta_fast")?.unwrap_or(32.0),
                beta_slow: truthy("beta_slow")?.unwrap_or(1.0),
                truncate,
                attention_factor,
            }
        }
        "longrope" => {
            let original = original()?;
            let list = |key: &str| -> Result<Vec<f32>> {
                let v = get(key).ok_or_else(|| {
                    err(&field(key), "missing; rope_type \"longrope\" needs it".into())
                })?;
                let items =
                    v.as_array().ok_or_else(|| err(&field(key), format!("{v} is not a list")))?;
                items
                    .iter()
                    .map(|x| x.as_f64().map(|x| x as f32))
                    .collect::<Option<Vec<f32>>>()
                    .ok_or_else(|| err(&field(key), "not a list of numbers".into()))
            };
            let (short_factor, long_factor) = (list("short_factor")?, list("long_factor")?);
            if let Some(head_dim) = fields.head_dim {
                let half = rotary_dim(head_dim, partial_rotary_factor) / 2;
                for (key, factors) in
                    [("short_factor", &short_factor), ("long_factor", &long_factor)]
                {
                    if factors.len() != half {
                        return Err(err(
                            &field(key),
                            format!("{} entries, expected rotary_dim / 2 = {half}", factors.len()),
                        ));
                    }
                }
            }
            let factor = num("factor")?.unwrap_or(max_positions / original);
            let attention_factor = match num("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / original.ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings: original as usize,
                attention_factor,
            }
        }
        "dynamic" => RopeScaling::Dynamic {
            factor: at_least_one("factor", required("factor")?)?,
            max_position_embeddings: fields.max_position_embeddings,
        },
        other => {
            return Err(err(
                &field("rope_type"),
                format!("{other:?} is not implemented ({IMPLEMENTED})"),
            ));
        }
    };
    Ok(RopeConfig { theta: theta as f32, scaling, partial_rotary_factor })
}
