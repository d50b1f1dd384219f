//! Sinusoidal timestep embeddings and the MLP that lifts them to the UNet's time-embedding width.
//!
//! Mirrors `get_timestep_embedding`, `Timesteps` and `TimestepEmbedding` in
//! `diffusers/models/embeddings.py` (diffusers 0.42.1), after the positional encoding of
//! "Attention Is All You Need" as used by DDPM (Ho et al., 2020).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};

use crate::activation::Activation;
use crate::linear::burn_linear;

/// The sinusoidal projection of timesteps (`Timesteps` in diffusers): no parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timesteps {
    /// Output width (`block_out_channels[0]` in the UNet).
    pub num_channels: usize,
    /// Put the cosines first (`flip_sin_to_cos`, true for SD).
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` (`freq_shift` in the UNet config; 0 for SD).
    pub downscale_freq_shift: f64,
    /// Multiplier of the arguments (1 for SD).
    pub scale: f64,
    /// Longest period (10000).
    pub max_period: f64,
}

impl Timesteps {
    /// The projection with diffusers' defaults for `scale` (1) and `max_period` (10000).
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self {
            num_channels,
            flip_sin_to_cos,
            downscale_freq_shift,
            scale: 1.0,
            max_period: 10000.0,
        }
    }

    /// Embeds each timestep.
    ///
    /// Frequencies are `exp(-ln(max_period) * i / (half - shift))` for `i < half = channels / 2`,
    /// computed in f32 as diffusers does; the output is `[sin, cos]` (or `[cos, sin]` when
    /// flipped), zero-padded by one column when `num_channels` is odd. Always f32.
    ///
    /// # Shapes
    /// - `timesteps`: `[batch]`
    /// - output: `[batch, num_channels]`
    pub fn forward(&self, timesteps: Tensor<1>) -> Tensor<2> {
        let device = timesteps.device();
        let half = self.num_channels / 2;
        let log_max = -(self.max_period.ln() as f32);
        let denom = (half as f64 - self.downscale_freq_shift) as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| ((log_max * i as f32) / denom).exp())
            .collect();
        let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &device);
        // [batch, 1] * [1, half] -> [batch, half]
        let args = timesteps
            .cast(burn::tensor::DType::F32)
            .unsqueeze_dim::<2>(1)
            * freqs.unsqueeze_dim::<2>(0);
        let args = if self.scale == 1.0 {
            args
        } else {
            args * self.scale
        };
        let (sin, cos) = (args.clone().sin(), args.cos());
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(vec![cos, sin], 1)
        } else {
            Tensor::cat(vec![sin, cos], 1)
        };
        if self.num_channels % 2 == 1 {
            emb.pad([(0, 0), (0, 1)], burn::tensor::ops::PadMode::Constant(0.0))
        } else {
            emb
        }
    }
}

/// `linear_1 -> act -> linear_2`: lifts the sinusoidal embedding to the time-embedding width.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    /// `cond_proj_dim -> in_channels`, no bias: a condition added to the input (the guidance
    /// embedding of guidance-distilled LCM UNets, diffusers' `timestep_cond`).
    pub cond_proj: Option<Linear>,
    /// `in_channels -> time_embed_dim`.
    pub linear_1: Linear,
    /// `time_embed_dim -> time_embed_dim`.
    pub linear_2: Linear,
    /// `act_fn` of the config.
    #[module(skip)]
    pub act: Activation,
}

impl TimestepEmbedding {
    /// A randomly initialised embedding (load weights afterwards).
    pub fn new(
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
        device: &Device,
    ) -> Self {
        Self {
            cond_proj: None,
            linear_1: LinearConfig::new(in_channels, time_embed_dim).init(device),
            linear_2: LinearConfig::new(time_embed_dim, time_embed_dim).init(device),
            act,
        }
    }

    /// With `cond_proj`, `cond_proj_dim -> in_channels` (diffusers' `cond_proj_dim`).
    pub fn with_cond_proj(mut self, cond_proj_dim: usize, device: &Device) -> Self {
        let in_channels = self.linear_1.weight.dims()[0];
        self.cond_proj = Some(
            LinearConfig::new(cond_proj_dim, in_channels)
                .with_bias(false)
                .init(device),
        );
        self
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels]`
    /// - output: `[batch, time_embed_dim]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward_with(x, None)
    }

    /// [`forward`](Self::forward) with `condition` (`[batch, cond_proj_dim]`) projected and
    /// added to the input first, when the embedding has a `cond_proj`.
    pub fn forward_with(&self, x: Tensor<2>, condition: Option<Tensor<2>>) -> Tensor<2> {
        let x = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => x + burn_linear(proj, c),
            _ => x,
        };
        let h = self.act.forward(burn_linear(&self.linear_1, x));
        burn_linear(&self.linear_2, h)
    }

    /// FLOPs of [`forward`](Self::forward) on `batch` rows ([`crate::flops`]).
    pub fn flops(&self, batch: usize) -> u64 {
        self.cond_proj
            .as_ref()
            .map_or(0, |p| crate::flops::linear(p, batch))
            + crate::flops::linear(&self.linear_1, batch)
            + crate::flops::linear(&self.linear_2, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_puts_cosines_first_and_zero_time_is_cos_one() {
        let device = Device::default();
        let t = Tensor::<1>::from_data(TensorData::new(vec![0.0f32, 10.0], [2]), &device);
        let emb = Timesteps::new(8, true, 0.0).forward(t);
        let v: Vec<f32> = emb.into_data().try_to_vec().unwrap();
        // t = 0: cos = 1 (first half), sin = 0 (second half).
        assert_eq!(&v[..8], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // t = 10, i = 0: cos(10), sin(10).
        assert!((v[8] - 10f32.cos()).abs() < 1e-6);
        assert!((v[12] - 10f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn odd_width_is_padded() {
        let device = Device::default();
        let t = Tensor::<1>::from_data(TensorData::new(vec![3.0f32], [1]), &device);
        assert_eq!(Timesteps::new(7, false, 1.0).forward(t).dims(), [1, 7]);
    }
}
