//! The shape of a CLIP model: what rebuilding it needs, read from a Hugging Face `config.json`,
//! a named preset, or the tensors of a checkpoint themselves.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The MLP's non-linearity: OpenAI's CLIPs use quick-GELU (x·σ(1.702x)); many open_clip
/// models (LAION) the exact GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::QuickGelu => "quick_gelu",
            Self::Gelu => "gelu",
        }
    }
}

/// One transformer tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tower {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// Hidden size of the MLP (`intermediate_size`).
    pub mlp: usize,
    pub activation: Activation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisionShape {
    #[serde(flatten)]
    pub tower: Tower,
    pub image_size: usize,
    pub patch_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextShape {
    #[serde(flatten)]
    pub tower: Tower,
    pub vocab: usize,
    /// Positions (77 for every CLIP).
    pub context: usize,
}

/// A CLIP model's shape. LayerNorm ε is 1e-5 everywhere (as in every released CLIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipShape {
    pub vision: VisionShape,
    pub text: TextShape,
    /// Width of the joint embedding space (`projection_dim`).
    pub embed_dim: usize,
}

pub const PRESETS: [&str; 4] = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"];

fn tower(width: usize, layers: usize) -> Tower {
    Tower {
        width,
        layers,
        heads: width / 64,
        mlp: 4 * width,
        activation: Activation::QuickGelu,
    }
}

impl ClipShape {
    /// OpenAI's released shapes (open_clip's names).
    pub fn preset(name: &str) -> Option<Self> {
        let (vision_width, vision_layers, patch, image, text_width, embed) = match name {
            "ViT-B-32" => (768, 12, 32, 224, 512, 512),
            "ViT-B-16" => (768, 12, 16, 224, 512, 512),
            "ViT-L-14" => (1024, 24, 14, 224, 768, 768),
            "ViT-L-14-336" => (1024, 24, 14, 336, 768, 768),
            _ => return None,
        };
        Some(Self {
            vision: VisionShape {
                tower: tower(vision_width, vision_layers),
                image_size: image,
                patch_size: patch,
            },
            text: TextShape {
                tower: tower(text_width, 12),
                vocab: 49_408,
                context: 77,
            },
            embed_dim: embed,
        })
    }

    /// The shape a transformers `CLIPConfig` (`config.json`) describes; absent fields take
    /// transformers' defaults (which are ViT-B/32's).
    pub fn from_hf_config(config: &Value) -> Result<Self, String> {
        let get = |section: &Value, key: &str, default: usize| -> Result<usize, String> {
            match section.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{key}` must be a positive integer, not {v}")),
            }
        };
        let act = |section: &Value| -> Result<Activation, String> {
            match section.get("hidden_act").and_then(Value::as_str) {
                None => Ok(Activation::QuickGelu),
                Some(a) => Activation::from_hf(a).ok_or_else(|| {
                    format!("`hidden_act: {a}` is not supported (quick_gelu or gelu)")
                }),
            }
        };
        if let Some(t) = config.get("model_type").and_then(Value::as_str)
            && t != "clip"
        {
            return Err(format!("`model_type` is `{t}`, not `clip`"));
        }
        let null = Value::Null;
        let t = config.get("text_config").unwrap_or(&null);
        let v = config.get("vision_config").unwrap_or(&null);
        let text_width = get(t, "hidden_size", 512)?;
        let vision_width = get(v, "hidden_size", 768)?;
        Ok(Self {
            vision: VisionShape {
                tower: Tower {
                    width: vision_width,
                    layers: get(v, "num_hidden_layers", 12)?,
                    heads: get(v, "num_attention_heads", 12)?,
                    mlp: get(v, "intermediate_size", 3072)?,
                    activation: act(v)?,
                },
                image_size: get(v, "image_size", 224)?,
                patch_size: get(v, "patch_size", 32)?,
            },
            text: TextShape {
                tower: Tower {
                    width: text_width,
                    layers: get(t, "num_hidden_layers", 12)?,
                    heads: get(t, "num_attention_heads", 8)?,
                    mlp: get(t, "intermediate_size", 2048)?,
                    activation: act(t)?,
                },
                vocab: get(t, "vocab_size", 49_408)?,
                context: get(t, "max_position_embeddings", 77)?,
            },
            embed_dim: get(config, "projection_dim", 512)?,
        })
        .and_then(|s: Self| s.check().map(|()| s))
    }

    /// transformers' `config.json` for this shape.
    pub fn to_hf_config(&self) -> Value {
        let (v, t) = (&self.vision, &self.text);
        serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.embed_dim,
            "logit_scale_init_value": 2.6592,
            "torch_dtype": "float32",
            "text_config": {
                "vocab_size": t.vocab,
                "hidden_size": t.tower.width,
                "intermediate_size": t.tower.mlp,
                "num_attention_heads": t.tower.heads,
                "num_hidden_layers": t.tower.layers,
                "max_position_embeddings": t.context,
                "hidden_act": t.tower.activation.hf_name(),
                "layer_norm_eps": 1e-5,
                "projection_dim": self.embed_dim,
                "bos_token_id": t.vocab.saturating_sub(2),
                "eos_token_id": t.vocab.saturating_sub(1),
            },
            "vision_config": {
                "hidden_size": v.tower.width,
                "intermediate_size": v.tower.mlp,
                "num_attention_heads": v.tower.heads,
                "num_hidden_layers": v.tower.layers,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": 3,
                "hidden_act": v.tower.activation.hf_name(),
                "layer_norm_eps": 1e-5,
                "projection_dim": self.embed_dim,
            },
        })
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.vision.image_size / self.vision.patch_size
    }

    /// Heads divide widths, patches tile the image.
    pub fn check(&self) -> Result<(), String> {
        for (name, t) in [("vision", &self.vision.tower), ("text", &self.text.tower)] {
            if t.heads == 0 || t.width % t.heads != 0 {
                return Err(format!(
                    "{name}: {} heads do not divide the width {}",
                    t.heads, t.width
                ));
            }
        }
        if self.vision.patch_size == 0
            || !self
                .vision
                .image_size
                .is_multiple_of(self.vision.patch_size)
        {
            return Err(format!(
                "vision: patches of {} px do not tile {} px images",
                self.vision.patch_size, self.vision.image_size
            ));
        }
        if self.text.context < 2 {
            return Err("text: the context must hold at least 2 tokens".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hf_config_round_trips_and_defaults_are_vit_b_32() {
        let b32 = ClipShape::preset("ViT-B-32").unwrap();
        assert_eq!(
            ClipShape::from_hf_config(&serde_json::json!({})).unwrap(),
            b32
        );
        for name in PRESETS {
            let s = ClipShape::preset(name).unwrap();
            assert_eq!(ClipShape::from_hf_config(&s.to_hf_config()).unwrap(), s);
        }
        let bad = serde_json::json!({"vision_config": {"hidden_size": 100}});
        assert!(
            ClipShape::from_hf_config(&bad)
                .unwrap_err()
                .contains("12 heads do not divide the width 100")
        );
        let act = serde_json::json!({"text_config": {"hidden_act": "relu"}});
        assert!(
            ClipShape::from_hf_config(&act)
                .unwrap_err()
                .contains("hidden_act: relu")
        );
    }
}
