//! Stage fingerprints: the cache key of a stage's result, and why it changed.
//!
//! A stage is executed only when no committed run record exists for its fingerprint. The
//! fingerprint is the sha256 of the canonical JSON ([`crate::canonical`]) of [`Ingredients`]:
//!
//! | ingredient      | what it is                                                        |
//! |-----------------|-------------------------------------------------------------------|
//! | `schema`        | [`SCHEMA_VERSION`]; bump to invalidate every cache entry at once  |
//! | `kind`          | the stage kind (`command`, `download`, …)                         |
//! | `kind_version`  | the kind's implementation version (`StageKind::version`)          |
//! | `config`        | the kind's normalised `with:` (+ `--set`): parameters substituted,|
//! |                 | every default and preset written in, `${inputs.X}`/`${out}` kept  |
//! | `inputs`        | per input: content digest of a project file/folder (by its name), |
//! |                 | or the *output* digest of an upstream stage or of the sub-path    |
//! |                 | read (by position: `@0`, `@1`, … in the order `config` uses them) |
//!
//! Left out on purpose:
//! * **how a value was written**: `seed: ${params.seed}` with `seed: 0` and `seed: 0` written
//!   out are the same computation, so the same key; so are a default left out and written in,
//!   and a preset named and spelt out (its values are hashed, not its name: a preset whose
//!   values change reruns exactly the stages using it). `written` (the `with:` block as
//!   written, parameters symbolic) and `params` (the values of the parameters it reads) are
//!   kept beside the key to explain a miss as "param seed changed 0 → 1", never hashed;
//! * the stage's **name** and an input's **origin** (path or upstream stage name): renaming
//!   does not change what is computed; origins are kept beside the key only to explain misses.
//!   Upstream outputs are named by position, not by the input name they were declared under,
//!   so `inputs: {d: ${scenes}}` + `${inputs.d}` and `${scenes}` written in `with:` are one key;
//! * **mtimes and absolute paths**: a moved project or cache, or a fresh clone, keeps its keys;
//!   `${inputs.X}` and `${out}` stay symbolic in `config`;
//! * `resources:` (how many GPUs): scheduling, not content;
//! * the host **environment** and tool versions outside the kind's version: declare what
//!   matters (a `command`'s `env:`, a `download`'s pinned version) and it is in `config`.
//!
//! Early cutoff follows from hashing upstream *outputs*: an upstream stage that reruns and
//! produces identical bytes leaves every downstream fingerprint unchanged.
//!
//! Debugging: `cusa-pipe status --json` shows the reasons; the ingredients of every committed
//! result are in its run record (`cache/runs-v1/…/<fingerprint>.json`), so two keys can be
//! diffed with any JSON tool.

pub mod content;
pub mod gather;
mod reason;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use reason::{MissReason, explain};

/// Version of the fingerprint scheme itself (2: the resolved `with:` is hashed, not the text
/// as written plus the parameters' values; 3: the kind's normalised config is hashed, with
/// defaults and presets written in; 4: upstream outputs named by position, so a reference
/// written in `with:` and one declared under `inputs:` are the same key).
pub const SCHEMA_VERSION: u32 = 4;

/// Everything a stage's result depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingredients {
    pub schema: u32,
    pub kind: String,
    pub kind_version: u32,
    /// The kind's normalised config, as the stage runs it (parameters substituted, defaults
    /// and presets written in, references symbolic). Hashed. (In records of schemas 1 and 2
    /// this key held the `with:` as written.)
    pub config: Value,
    /// `with:` as written (+ `--set`), parameters symbolic; explanation only, never hashed.
    /// Absent (null) in records of schemas 1 and 2.
    #[serde(default)]
    pub written: Value,
    /// The parameters `config` reads, with their values; explanation only, never hashed.
    pub params: BTreeMap<String, Value>,
    pub inputs: BTreeMap<String, InputIngredient>,
}

/// One input's contribution: its digest, and (not hashed) where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputIngredient {
    pub digest: String,
    pub origin: Origin,
}

/// Where an input came from; explanation only, never hashed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "lowercase")]
pub enum Origin {
    Project { path: String },
    Stage { stage: String, sub: Option<String> },
}

/// A stage's cache key (hex sha256).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(pub String);

impl Fingerprint {
    /// The first 12 hex digits, for display.
    pub fn short(&self) -> &str {
        &self.0[..12.min(self.0.len())]
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Ingredients {
    /// The fingerprint: sha256 over the canonical encoding of the hashed ingredients
    /// (explanations and origins left out).
    pub fn fingerprint(&self) -> Fingerprint {
        #[derive(Serialize)]
        struct Hashed<'a> {
            schema: u32,
            kind: &'a str,
            kind_version: u32,
            config: &'a Value,
            inputs: BTreeMap<&'a str, &'a str>,
        }
        let hashed = Hashed {
            schema: self.schema,
            kind: &self.kind,
            kind_version: self.kind_version,
            config: &self.config,
            inputs: self
                .inputs
                .iter()
                .map(|(k, v)| (k.as_str(), v.digest.as_str()))
                .collect(),
        };
        let mut h = Sha256::new();
        h.update(b"cusa-pipe stage fingerprint\0");
        h.update(crate::canonical::to_vec(&hashed));
        Fingerprint(hex::encode(h.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Ingredients {
        Ingredients {
            schema: SCHEMA_VERSION,
            kind: "command".into(),
            kind_version: 1,
            config: serde_json::json!({"run": "python3 ${inputs.script} 1000"}),
            written: serde_json::json!({"run": "python3 ${inputs.script} ${params.n}"}),
            params: BTreeMap::from([("n".into(), Value::from(1000))]),
            inputs: BTreeMap::from([(
                "script".into(),
                InputIngredient {
                    digest: "aa".into(),
                    origin: Origin::Project {
                        path: "gen.py".into(),
                    },
                },
            )]),
        }
    }

    #[test]
    fn origins_and_key_order_do_not_change_the_fingerprint() {
        let a = base();
        let mut b = base();
        b.inputs.get_mut("script").unwrap().origin = Origin::Project {
            path: "moved/gen.py".into(),
        };
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut c = base();
        c.config = serde_json::json!({"run": "python3 ${inputs.script} 1000"});
        assert_eq!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn a_value_written_out_has_the_key_of_the_parameter_it_equals() {
        let mut written_out = base();
        written_out.written = written_out.config.clone();
        written_out.params.clear();
        assert_eq!(base().fingerprint(), written_out.fingerprint());
    }

    #[test]
    fn every_hashed_ingredient_changes_the_fingerprint() {
        let a = base().fingerprint();
        let mut x = base();
        x.schema += 1;
        assert_ne!(a, x.fingerprint());
        let mut x = base();
        x.kind_version = 2;
        assert_ne!(a, x.fingerprint());
        let mut x = base();
        x.inputs.get_mut("script").unwrap().digest = "bb".into();
        assert_ne!(a, x.fingerprint());
        let mut x = base();
        x.config = serde_json::json!({"run": "python3 ${inputs.script} 2000"});
        assert_ne!(a, x.fingerprint());
    }

    /// Pins the encoding: changing it silently would invalidate every user's cache, so it
    /// must come with a SCHEMA_VERSION bump and an update of this value.
    #[test]
    fn fingerprint_encoding_is_stable() {
        assert_eq!(base().fingerprint().0, STABLE_KEY);
    }

    /// sha256(b"cusa-pipe stage fingerprint\0" + json.dumps(ingredients, sort_keys=True,
    /// separators=(",", ":"), ensure_ascii=False)) in Python, over schema, kind, kind_version,
    /// resolved and the input digests.
    const STABLE_KEY: &str = "e8e2f8662ba46bb84fc49b2c7756f1c5db01a2a5a1ab6e8aff6a4491456a4950";
}
