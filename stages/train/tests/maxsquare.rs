//! MaxSquare's losses and their gradients against values computed independently with NumPy
//! (tests/fixtures/make_maxsquare.py), and the method as the method table binds it.

use burn::tensor::{Device, Tensor, TensorData, Tolerance};
use dag_api::{Map, Value};
use dag_train::methods::method;
use dag_train::objectives::maxsquare::{image_weighted_max_squares_loss, max_squares_loss};

struct Fixture(serde_json::Value);

impl Fixture {
    fn load() -> Self {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/maxsquare.json");
        Fixture(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
    }
    fn floats(&self, key: &str) -> Vec<f32> {
        let values = self.0[key].as_array().unwrap();
        values.iter().map(|v| v.as_f64().unwrap() as f32).collect()
    }
    fn scalar(&self, key: &str) -> f32 {
        self.0[key].as_f64().unwrap() as f32
    }
    fn shape(&self) -> [usize; 4] {
        let dims: Vec<usize> = (0..4)
            .map(|i| self.0["shape"][i].as_u64().unwrap() as usize)
            .collect();
        dims.try_into().unwrap()
    }
    fn data(&self, key: &str) -> TensorData {
        TensorData::new(self.floats(key), self.shape())
    }
}

/// The loss `loss` gives the fixture's logits, and its gradient with respect to them.
fn value_and_gradient(f: &Fixture, loss: impl Fn(Tensor<4>) -> Tensor<1>) -> (f32, TensorData) {
    let device = Device::flex().autodiff();
    let logits = Tensor::<4>::from_data(f.data("logits"), &device).require_grad();
    let value = loss(logits.clone());
    let grads = value.backward();
    let gradient = logits.grad(&grads).expect("a gradient of the logits");
    (value.into_scalar(), gradient.into_data())
}

fn assert_close(got: f32, expected: f32) {
    assert!(
        (got - expected).abs() <= 1e-6 * expected.abs().max(1.0),
        "got {got}, expected {expected}"
    );
}

#[test]
fn max_squares_loss_and_gradient_match_numpy() {
    let f = Fixture::load();
    let (value, gradient) = value_and_gradient(&f, max_squares_loss);
    assert_close(value, f.scalar("max_squares"));
    gradient.assert_approx_eq::<f32>(&f.data("max_squares_grad"), Tolerance::absolute(1e-7));
}

#[test]
fn image_weighted_loss_and_gradient_match_numpy() {
    let f = Fixture::load();
    let ratio = f.0["ratio"].as_f64().unwrap();
    let (value, gradient) = value_and_gradient(&f, |z| image_weighted_max_squares_loss(z, ratio));
    assert_close(value, f.scalar("iw_max_squares"));
    gradient.assert_approx_eq::<f32>(&f.data("iw_max_squares_grad"), Tolerance::absolute(1e-7));
}

#[test]
fn the_method_weighs_the_heads_and_switches_the_weighting() {
    let f = Fixture::load();
    let device = Device::flex();
    let logits = Tensor::<4>::from_data(f.data("logits"), &device);
    let maxsquare = method("maxsquare").unwrap();
    assert!(maxsquare.uses_target() && !maxsquare.adversarial);
    let terms = |params: Map<String, Value>| -> Vec<(&'static str, f64, f32)> {
        let objective = maxsquare.target[0].bind(&params).unwrap();
        objective
            .terms(&logits, Some(&logits))
            .into_iter()
            .map(|t| (t.name, t.weight, t.value.into_scalar()))
            .collect()
    };

    // The paper's defaults: the main head only, weight 0.1, no image-wise weighting.
    let plain = terms(Map::new());
    assert_eq!(plain.len(), 1);
    assert_eq!((plain[0].0, plain[0].1), ("maxsq_main", 0.1));
    assert_close(plain[0].2, f.scalar("max_squares"));

    let mut given = Map::new();
    given.insert("maxsq_image_weighting".into(), Value::from(true));
    given.insert("maxsq_iw_ratio".into(), f.0["ratio"].clone());
    given.insert("lambda_maxsq_aux".into(), Value::from(0.01));
    let weighted = terms(given);
    let names: Vec<_> = weighted.iter().map(|t| (t.0, t.1)).collect();
    assert_eq!(names, [("maxsq_main", 0.1), ("maxsq_aux", 0.01)]);
    assert_close(weighted[0].2, f.scalar("iw_max_squares"));
}
