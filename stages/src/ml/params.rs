//! A module's float parameters, listed once: each one's path (field names joined by `.`, as in
//! saved records and Hugging Face keys), id and shape.
//!
//! The optimiser's decay groups and the check of loaded weights both walk a student's
//! parameters by path; this is the one walk. Shapes are read without initialising lazy
//! parameters (a fresh CLIP's random weights are never materialised just to be listed).

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// One float parameter of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloatParam {
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
}

impl FloatParam {
    /// Whether a field named `field` is on the parameter's path.
    pub fn is_under(&self, field: &str) -> bool {
        self.path.split('.').any(|p| p == field)
    }
}

/// Every float parameter of `module`, in visiting order.
pub fn float_params<B: Backend, M: Module<B>>(module: &M) -> Vec<FloatParam> {
    struct Walk {
        path: Vec<String>,
        found: Vec<FloatParam>,
    }
    impl<B: Backend> ModuleVisitor<B> for Walk {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.found.push(FloatParam {
                path: self.path.join("."),
                id: param.id,
                shape: param.lazy_shape().to_vec(),
            });
        }
    }
    let mut walk = Walk {
        path: Vec::new(),
        found: Vec::new(),
    };
    module.visit(&mut walk);
    walk.found
}
