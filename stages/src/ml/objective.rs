//! The training objective: named terms, summed.
//!
//! A term is one of docs/method.md's losses with its weight: `base` (InfoNCE or VSE++), `csa`
//! (α), `usa` (β), `lca` and `cra` (SelfAlign). Each says what it needs (teacher soft labels,
//! uni heads, locals), which learnable parameters it owns, and computes its weighted value
//! from one batch's [`Embeddings`]. Logs, metrics, reports and benchmarks iterate over the
//! terms by name, so a new term is added here and nowhere else.
//!
//! Invariants:
//! * the objective is the plain sum of its terms' weighted values, in the order of
//!   [`Objective::terms`] (`base` first);
//! * a term whose inputs the batch lacks is a programming error caught before training (the
//!   config checks: soft labels for `csa`/`usa`, a student with locals for `lca`/`cra`), so
//!   [`Objective::evaluate`] never silently drops a term.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

use super::Where;
use super::loss::{self, Reduction};
use super::selfalign::{self, CraConfig, GuideStats, LcaConfig};
use super::student::{Embeddings, Temperatures};
use crate::ml::selfalign::SelfAlign;

/// The base loss of the objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Base {
    /// InfoNCE with multi-positive targets and the learnable τ.
    Infonce(Reduction),
    /// VSE++ hardest-negative hinge with this margin.
    Vse(f64),
}

/// One term of the objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Term {
    Base(Base),
    Csa { alpha: f64 },
    Usa { beta: f64 },
    Lca(LcaConfig),
    Cra(CraConfig),
}

/// What a term reads besides the cross-modal embeddings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// The teachers' in-batch soft labels.
    pub soft_labels: bool,
    /// The uni heads' embeddings.
    pub uni: bool,
    /// Image regions and word states.
    pub locals: bool,
}

impl Term {
    /// The term's name: `loss_<name>` in `log.jsonl`, a row label in `bench train`.
    pub fn name(&self) -> &'static str {
        match self {
            Term::Base(_) => "base",
            Term::Csa { .. } => "csa",
            Term::Usa { .. } => "usa",
            Term::Lca(_) => "lca",
            Term::Cra(_) => "cra",
        }
    }

    pub fn needs(&self) -> Needs {
        match self {
            Term::Base(_) => Needs::default(),
            Term::Csa { .. } => Needs {
                soft_labels: true,
                ..Needs::default()
            },
            Term::Usa { .. } => Needs {
                soft_labels: true,
                uni: true,
                ..Needs::default()
            },
            Term::Lca(_) | Term::Cra(_) => Needs {
                locals: true,
                ..Needs::default()
            },
        }
    }

    /// The learnable parameters the term owns (besides the encoders), as logged.
    pub fn parameters(&self) -> &'static [&'static str] {
        match self {
            Term::Base(Base::Infonce(_)) => &["tau"],
            Term::Base(Base::Vse(_)) => &[],
            Term::Csa { .. } => &["tau_c"],
            Term::Usa { .. } => &["tau_ui", "tau_ut"],
            Term::Lca(_) => &["prototypes"],
            Term::Cra(_) => &["image_guide", "text_guide"],
        }
    }
}

/// What a batch brings besides its embeddings.
pub struct BatchTargets<B: Backend> {
    /// The image of each pair (equal ids: the same image).
    pub image_ids: Vec<u64>,
    /// Teacher soft labels (image, text), for CSA/USA.
    pub soft_labels: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    /// 0-based epoch (LCA's prototypes are frozen during the first `freeze_epochs`).
    pub epoch: usize,
}

/// One batch's objective: the differentiable total, each term's weighted value by name, and
/// the guides' batch statistics for their running statistics.
pub struct Evaluated<B: Backend> {
    pub total: Tensor<B, 1>,
    pub values: Vec<(&'static str, f64)>,
    pub guide_stats: Option<GuideStats>,
}

/// The configured terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub terms: Vec<Term>,
    /// τ_s of the teachers' soft labels the CSA and USA terms read (CUSA's: 1.0).
    pub soft_temperature: f64,
    /// The direction of CSA's and USA's KL (CUSA's: forward, KL(P‖Q)).
    pub soft_kl: loss::Kl,
    /// The kind of device it is computed for ([`Where`]): on a CPU backend SelfAlign's terms
    /// on the host with their gradients by hand, on a GPU tensor operations and autodiff
    /// throughout, with the caption→image similarities of InfoNCE and CSA as their own product.
    /// The same function either way (both forms checked against numpy).
    pub on: Where,
}

/// Why a batch cannot be scored.
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    #[error("the `{term}` term needs {what}, which this batch or student does not have")]
    Missing {
        term: &'static str,
        what: &'static str,
    },
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_or(f64::NAN, |v| v[0])
}

fn same_image<B: Backend>(ids: &[u64], device: &B::Device) -> Tensor<B, 2, Bool> {
    loss::same_image::<B>(ids, device)
}

impl Objective {
    /// The term names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.terms.iter().map(Term::name).collect()
    }

    /// What the terms need together.
    pub fn needs(&self) -> Needs {
        self.terms.iter().fold(Needs::default(), |a, t| {
            let n = t.needs();
            Needs {
                soft_labels: a.soft_labels || n.soft_labels,
                uni: a.uni || n.uni,
                locals: a.locals || n.locals,
            }
        })
    }

    pub fn lca(&self) -> Option<LcaConfig> {
        self.terms.iter().find_map(|t| match t {
            Term::Lca(c) => Some(*c),
            _ => None,
        })
    }

    pub fn cra(&self) -> Option<CraConfig> {
        self.terms.iter().find_map(|t| match t {
            Term::Cra(c) => Some(*c),
            _ => None,
        })
    }

    /// The objective of one batch.
    pub fn evaluate<B: Backend>(
        &self,
        e: &Embeddings<B>,
        temps: &Temperatures<B>,
        selfalign: Option<&SelfAlign<B>>,
        targets: &BatchTargets<B>,
    ) -> Result<Evaluated<B>, ObjectiveError> {
        let device = e.image.cross.device();
        let (f_i, f_t) = (&e.image.cross, &e.text.cross);
        let missing = |term: &Term, what| ObjectiveError::Missing {
            term: term.name(),
            what,
        };
        let mut total: Option<Tensor<B, 1>> = None;
        let mut values = Vec::with_capacity(self.terms.len());
        let mut guide_stats = None;
        // LCA and CRA read the same locals: on the host, once (one evaluation's copies).
        let share = selfalign::Share::default();
        for term in &self.terms {
            let value = match *term {
                Term::Base(Base::Infonce(reduction)) => loss::infonce(
                    f_i.clone(),
                    f_t.clone(),
                    temps.tau.val(),
                    loss::multi_positive_targets::<B>(&targets.image_ids, &device),
                    reduction,
                    self.on,
                ),
                Term::Base(Base::Vse(margin)) => loss::vse_hardest(
                    f_i.clone(),
                    f_t.clone(),
                    same_image::<B>(&targets.image_ids, &device),
                    margin,
                ),
                Term::Csa { alpha } => {
                    let (p_i, p_t) = targets
                        .soft_labels
                        .clone()
                        .ok_or_else(|| missing(term, "teacher soft labels"))?;
                    loss::csa(
                        f_i.clone(),
                        f_t.clone(),
                        temps.tau_c.val(),
                        p_i,
                        p_t,
                        self.soft_kl,
                        self.on,
                    ) * alpha
                }
                Term::Usa { beta } => {
                    let (p_i, p_t) = targets
                        .soft_labels
                        .clone()
                        .ok_or_else(|| missing(term, "teacher soft labels"))?;
                    let (Some(g_i), Some(g_t)) = (&e.image.uni, &e.text.uni) else {
                        return Err(missing(term, "uni heads"));
                    };
                    loss::usa(
                        g_i.clone(),
                        g_t.clone(),
                        temps.tau_ui.val(),
                        temps.tau_ut.val(),
                        p_i,
                        p_t,
                        self.soft_kl,
                    ) * beta
                }
                Term::Lca(c) => {
                    let (Some(v), Some(t)) = (&e.image.locals, &e.text.locals) else {
                        return Err(missing(term, "locals"));
                    };
                    let prototypes = selfalign
                        .and_then(|s| s.prototypes.as_ref())
                        .ok_or_else(|| missing(term, "prototypes"))?
                        .val();
                    let prototypes = if targets.epoch < c.freeze_epochs {
                        prototypes.detach()
                    } else {
                        prototypes
                    };
                    selfalign::lca(v, t, prototypes, &c, self.on, &share) * c.weight
                }
                Term::Cra(c) => {
                    let (Some(v), Some(t)) = (&e.image.locals, &e.text.locals) else {
                        return Err(missing(term, "locals"));
                    };
                    let (Some(gi), Some(gt)) = (
                        selfalign.and_then(|s| s.image_guide.as_ref()),
                        selfalign.and_then(|s| s.text_guide.as_ref()),
                    ) else {
                        return Err(missing(term, "guide heads"));
                    };
                    let (image_guide, image_stats) = gi.forward_train(v.mean());
                    let (text_guide, text_stats) = gt.forward_train(t.mean());
                    guide_stats = Some((image_stats, text_stats));
                    let ids = &targets.image_ids;
                    let (tau, hardest, place) = (c.temperature, c.hardest, self.on);
                    let t2v =
                        selfalign::cra_direction(text_guide, v, ids, tau, hardest, place, &share);
                    let v2t =
                        selfalign::cra_direction(image_guide, t, ids, tau, hardest, place, &share);
                    (t2v + v2t) * (0.5 * c.weight)
                }
            };
            values.push((term.name(), scalar(value.clone().detach())));
            total = Some(match total {
                Some(t) => t + value,
                None => value,
            });
        }
        let total = total.unwrap_or_else(|| Tensor::zeros([1], &device));
        Ok(Evaluated {
            total,
            values,
            guide_stats,
        })
    }
}
