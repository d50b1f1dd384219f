//! Where ancestral and SDE samplers get their noise: a caller-supplied [`NoiseSource`].
//!
//! Backend RNG streams differ between backends, so Kiln draws noise on the host from a seeded
//! generator ([`SeededNoise`]) and uploads it; tests replay recorded noise with [`QueuedNoise`].

use std::collections::VecDeque;

use burn::tensor::{Device, Tensor, TensorData};

use crate::{Error, Result};

/// A source of standard-normal noise tensors for the stochastic samplers.
pub trait NoiseSource {
    /// One tensor of i.i.d. N(0, 1) values of `shape` on `device`.
    fn noise(&mut self, shape: [usize; 4], device: &Device) -> Result<Tensor<4>>;
}

/// Seeded host-side Gaussian noise (SplitMix64 + Box-Muller): the same numbers on every backend.
///
/// Its state serializes (serde), so a training run can save its generator and resume the same
/// stream of draws.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SeededNoise {
    state: u64,
    spare: Option<f64>,
}

impl SeededNoise {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (`n >= 1`): training timesteps, shuffles, crops.
    pub fn next_index(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n.max(1) as u128) >> 64) as usize
    }

    /// A uniform number in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// One standard-normal number.
    pub fn next_normal(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

impl NoiseSource for SeededNoise {
    fn noise(&mut self, shape: [usize; 4], device: &Device) -> Result<Tensor<4>> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.next_normal() as f32).collect();
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }
}

/// Noise replayed from a queue of tensors, in order (for parity tests and reproductions).
#[derive(Debug, Default)]
pub struct QueuedNoise {
    queue: VecDeque<Tensor<4>>,
}

impl QueuedNoise {
    /// A queue holding `tensors`, first out first.
    pub fn new(tensors: impl IntoIterator<Item = Tensor<4>>) -> Self {
        Self {
            queue: tensors.into_iter().collect(),
        }
    }

    /// How many tensors are left.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for QueuedNoise {
    fn noise(&mut self, shape: [usize; 4], _device: &Device) -> Result<Tensor<4>> {
        let next = self
            .queue
            .pop_front()
            .ok_or_else(|| Error::Noise("the queue is empty".into()))?;
        if next.dims() != shape {
            return Err(Error::Shape(format!(
                "queued noise is {:?}, the sample is {shape:?}",
                next.dims()
            )));
        }
        Ok(next)
    }
}

/// A source for deterministic samplers: asking it for noise is an error.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoNoise;

impl NoiseSource for NoNoise {
    fn noise(&mut self, _shape: [usize; 4], _device: &Device) -> Result<Tensor<4>> {
        Err(Error::Noise(
            "this sampler is stochastic: pass a noise source such as `SeededNoise`".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seed names one stream of numbers on every machine and in every release: the first
    /// draws of seed 42, as f32 bit patterns, as an independent Python transcription of
    /// SplitMix64 and Box-Muller computes them (docs/determinism.md). Changing the generator
    /// changes every seeded image users have, so this pin must only move on purpose.
    #[test]
    fn seeded_stream_is_pinned() {
        let mut rng = SeededNoise::new(42);
        let bits: Vec<u32> = (0..8)
            .map(|_| (rng.next_normal() as f32).to_bits())
            .collect();
        assert_eq!(
            bits,
            [
                0x3ed45626, 0x3f27161e, 0xbf6452a8, 0x3fa9d5af, 0x3fdd634e, 0xbff113cd, 0x3f0badc8,
                0xbfd41332
            ]
        );
    }
}
