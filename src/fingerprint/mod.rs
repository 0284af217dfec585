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
//! | `config`        | the `with:` block as written (+ `--set`), `${params.X}` symbolic  |
//! | `params`        | the value of every parameter the stage references                 |
//! | `inputs`        | per input name: content digest of a project file/folder, or the   |
//! |                 | *output* digest of the upstream stage (or of the sub-path read)   |
//!
//! Left out on purpose:
//! * the stage's **name** and an input's **origin** (path or upstream stage name): renaming
//!   does not change what is computed; origins are kept beside the key only to explain misses;
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
mod reason;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use reason::{MissReason, explain};

/// Version of the fingerprint scheme itself.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything a stage's result depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingredients {
    pub schema: u32,
    pub kind: String,
    pub kind_version: u32,
    pub config: Value,
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
    /// The fingerprint: sha256 over the canonical encoding, origins left out.
    pub fn fingerprint(&self) -> Fingerprint {
        #[derive(Serialize)]
        struct Hashed<'a> {
            schema: u32,
            kind: &'a str,
            kind_version: u32,
            config: &'a Value,
            params: &'a BTreeMap<String, Value>,
            inputs: BTreeMap<&'a str, &'a str>,
        }
        let hashed = Hashed {
            schema: self.schema,
            kind: &self.kind,
            kind_version: self.kind_version,
            config: &self.config,
            params: &self.params,
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
            config: serde_json::json!({"run": "python3 ${inputs.script} ${params.n}"}),
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
        c.config = serde_json::json!({"run": "python3 ${inputs.script} ${params.n}"});
        assert_eq!(a.fingerprint(), c.fingerprint());
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
        x.params.insert("n".into(), Value::from(2000));
        assert_ne!(a, x.fingerprint());
        let mut x = base();
        x.inputs.get_mut("script").unwrap().digest = "bb".into();
        assert_ne!(a, x.fingerprint());
        let mut x = base();
        x.config = serde_json::json!({"run": "python3 other"});
        assert_ne!(a, x.fingerprint());
    }

    /// Pins the encoding: changing it silently would invalidate every user's cache, so it
    /// must come with a SCHEMA_VERSION bump and an update of this value.
    #[test]
    fn fingerprint_encoding_is_stable() {
        assert_eq!(base().fingerprint().0, STABLE_KEY);
    }

    /// sha256(b"cusa-pipe stage fingerprint\0" + json.dumps(ingredients, sort_keys=True,
    /// separators=(",", ":"), ensure_ascii=False)) in Python, origins left out.
    const STABLE_KEY: &str = "1d1b695d07ee4f42d5ed729923ea118a63cd99368ab6636a72161abdd11d4601";
}
