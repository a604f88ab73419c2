//! The losses against values computed independently with NumPy (tests/fixtures/make_losses.py).

use burn::tensor::{Device, Int, Tensor, TensorData, Tolerance};
use dag_train::losses::{bce_with_logits, entropy_loss, masked_cross_entropy, self_information};

struct Fixture(serde_json::Value);

impl Fixture {
    fn load() -> Self {
        let path = std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
        )
        .join("tests/fixtures/losses.json");
        Fixture(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
    }
    fn floats(&self, key: &str) -> Vec<f32> {
        self.0[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    }
    fn scalar(&self, key: &str) -> f32 {
        self.0[key].as_f64().unwrap() as f32
    }
    fn shape<const D: usize>(&self, key: &str) -> [usize; D] {
        let v: Vec<usize> = self.0[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        v.try_into().unwrap()
    }
    fn logits(&self, device: &Device) -> Tensor<4> {
        Tensor::from_data(
            TensorData::new(self.floats("logits"), self.shape::<4>("shape")),
            device,
        )
    }
}

fn close(got: Tensor<1>, expected: f32) {
    let v: f32 = got.into_scalar();
    assert!(
        (v - expected).abs() <= 1e-5 * expected.abs().max(1.0),
        "got {v}, expected {expected}"
    );
}

#[test]
fn masked_cross_entropy_ignores_255() {
    let f = Fixture::load();
    let device = Device::flex();
    let [n, _, h, w] = f.shape::<4>("shape");
    let labels: Vec<i64> = f.0["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let labels = Tensor::<3, Int>::from_data(TensorData::new(labels, [n, h, w]), &device);
    close(
        masked_cross_entropy(f.logits(&device), labels),
        f.scalar("cross_entropy"),
    );
}

#[test]
fn cross_entropy_of_an_unlabelled_batch_is_zero() {
    let device = Device::flex();
    let logits = Tensor::<4>::ones([1, 3, 2, 2], &device);
    let labels = Tensor::<3, Int>::full([1, 2, 2], 255, &device);
    close(masked_cross_entropy(logits, labels), 0.0);
}

#[test]
fn self_information_map_matches_numpy() {
    let f = Fixture::load();
    let device = Device::flex();
    let expected = TensorData::new(f.floats("self_information"), f.shape::<4>("shape"));
    self_information(f.logits(&device))
        .into_data()
        .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-6));
}

#[test]
fn minent_matches_numpy() {
    let f = Fixture::load();
    close(
        entropy_loss(f.logits(&Device::flex())),
        f.scalar("entropy_loss"),
    );
}

#[test]
fn bce_with_constant_labels_matches_numpy() {
    let f = Fixture::load();
    let device = Device::flex();
    let logits = || {
        Tensor::<4>::from_data(
            TensorData::new(f.floats("d_logits"), f.shape::<4>("d_shape")),
            &device,
        )
    };
    close(bce_with_logits(logits(), 0.0), f.scalar("bce_label0"));
    close(bce_with_logits(logits(), 1.0), f.scalar("bce_label1"));
    // The stable form stays finite where a naive log(sigmoid) would not.
    let extreme = Tensor::<4>::from_data(
        TensorData::new(vec![-200.0f32, 200.0], [1, 1, 1, 2]),
        &device,
    );
    close(bce_with_logits(extreme, 0.0), 100.0);
}

#[test]
fn poly_schedule() {
    use dag_train::poly_lr;
    assert_eq!(poly_lr(2.5e-4, 0, 250_000, 0.9), 2.5e-4);
    let half = poly_lr(1.0, 125_000, 250_000, 0.9);
    assert!((half - 0.5f64.powf(0.9)).abs() < 1e-12);
    assert_eq!(poly_lr(1.0, 300_000, 250_000, 0.9), 0.0);
}
