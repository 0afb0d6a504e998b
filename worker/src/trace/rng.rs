//! numpy's legacy `RandomState`, bit for bit: the noise ROME adds.
//!
//! ROME's `trace_with_patch` re-seeds `numpy.random.RandomState(1)` for every run and draws
//! `randn(S, e - b, d)` (or `uniform(-1, 1, …)`). `RandomState(seed)` with an integer seed is
//! MT19937 initialised by `init_genrand(seed)` (Matsumoto & Nishimura, 1998); doubles take 53
//! bits from two 32-bit outputs; `randn` is the legacy polar (Marsaglia) method, which draws
//! pairs and keeps the second value for the next call; `uniform(lo, hi)` is `lo + (hi - lo) * u`.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// numpy's `RandomState` with the legacy Gaussian cache.
#[derive(Clone)]
pub struct RandomState {
    mt: [u32; N],
    index: usize,
    cached_gauss: Option<f64>,
}

impl RandomState {
    /// `numpy.random.RandomState(seed)` for an integer seed (`init_genrand`).
    pub fn new(seed: u32) -> Self {
        let mut mt = [0u32; N];
        mt[0] = seed;
        for i in 1..N {
            mt[i] =
                1_812_433_253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Self { mt, index: N, cached_gauss: None }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.mt[i] & UPPER_MASK) | (self.mt[(i + 1) % N] & LOWER_MASK);
            let mag = if y & 1 == 0 { 0 } else { MATRIX_A };
            self.mt[i] = self.mt[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// The next tempered 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A double in [0, 1) with 53 random bits (`random_sample`).
    pub fn next_f64(&mut self) -> f64 {
        let a = self.next_u32() >> 5;
        let b = self.next_u32() >> 6;
        (f64::from(a) * 67_108_864.0 + f64::from(b)) / 9_007_199_254_740_992.0
    }

    /// One standard normal value (`legacy_gauss`).
    pub fn gauss(&mut self) -> f64 {
        if let Some(g) = self.cached_gauss.take() {
            return g;
        }
        loop {
            let x1 = 2.0 * self.next_f64() - 1.0;
            let x2 = 2.0 * self.next_f64() - 1.0;
            let r2 = x1 * x1 + x2 * x2;
            if r2 < 1.0 && r2 != 0.0 {
                // Rust's ln and sqrt are the C library's, as numpy's are.
                let f = (-2.0 * r2.ln() / r2).sqrt();
                self.cached_gauss = Some(f * x1);
                return f * x2;
            }
        }
    }

    /// `randn(n)`, flattened in C order.
    pub fn randn(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.gauss()).collect()
    }

    /// `uniform(low, high, n)`.
    pub fn uniform(&mut self, low: f64, high: f64, n: usize) -> Vec<f64> {
        (0..n).map(|_| low + (high - low) * self.next_f64()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/numpy_noise.json");
        let text = std::fs::read_to_string(path)
            .expect("tests/fixtures/numpy_noise.json (tools/numpy_noise.py)");
        serde_json::from_str(&text).expect("json")
    }

    fn floats(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().expect("array").iter().map(|x| x.as_f64().expect("float")).collect()
    }

    /// Every value numpy printed, compared with `==`: the stream is bit-identical.
    #[test]
    fn reproduces_numpy_random_state_1() {
        let f = fixture();
        let shape: Vec<usize> = f["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|x| x.as_u64().expect("dim") as usize)
            .collect();
        let n: usize = shape.iter().product();
        let pick: Vec<usize> = f["pick"]
            .as_array()
            .expect("pick")
            .iter()
            .map(|x| x.as_u64().expect("i") as usize)
            .collect();

        let mut rs = RandomState::new(1);
        assert_eq!((0..6).map(|_| rs.next_f64()).collect::<Vec<_>>(), floats(&f["random_sample"]));
        assert_eq!(RandomState::new(1).randn(30), floats(&f["randn_small"]));
        assert_eq!(RandomState::new(1).uniform(-1.0, 1.0, 30), floats(&f["uniform_small"]));

        let big = RandomState::new(1).randn(n);
        assert_eq!(pick.iter().map(|&i| big[i]).collect::<Vec<_>>(), floats(&f["randn_pick"]));
        // numpy's sum is pairwise; ours sequential: equal to rounding, which is all a sum shows.
        let sum: f64 = big.iter().sum();
        assert!((sum - f["randn_sum"].as_f64().expect("sum")).abs() < 1e-9);
        let big = RandomState::new(1).uniform(-1.0, 1.0, n);
        assert_eq!(pick.iter().map(|&i| big[i]).collect::<Vec<_>>(), floats(&f["uniform_pick"]));

        let mut rs = RandomState::new(1);
        rs.randn(3);
        assert_eq!(rs.randn(4), floats(&f["randn_after_odd"]));
    }
}
