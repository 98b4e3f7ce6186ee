//! A routed batch for the grouped GEMM tests: a random top-k routing with unrouted and remote pairs, its alignment
//! into 64-slot prefill tiles, and that alignment on the device as the kernels' [`Grouping`].

use rand::{rngs::StdRng, Rng};
use small4::device::{Device, DeviceBuffer};
use small4::kernels::moe::{self, Grouping};
use small4::reference::moe::{align_pairs, Alignment};

/// A routing of `tokens` tokens to `k` experts each and its alignment into expert tiles.
pub struct RoutedBatch {
    pub tokens: usize,
    pub k: usize,
    /// `[tokens * k]` the global expert of each pair, -1 for an unrouted one.
    pub ids: Vec<i32>,
    /// `[tokens * k]` each pair's routing weight.
    pub weights: Vec<f32>,
    pub tile_m: usize,
    pub alignment: Alignment,
}

impl RoutedBatch {
    /// Each of `tokens` tokens picks `k` distinct experts of `experts` with weights in [0.1, 1); the last `remote`
    /// experts are owned by another GPU and every seventh pair (from the fourth) is unrouted, so some pairs have no
    /// slot. The batch must be prefill-sized (64-slot tiles).
    pub fn random(rng: &mut StdRng, tokens: usize, k: usize, experts: usize, remote: usize) -> Self {
        let mut ids = Vec::with_capacity(tokens * k);
        let mut weights = Vec::with_capacity(tokens * k);
        for _ in 0..tokens {
            let mut chosen: Vec<i32> = (0..experts as i32).collect();
            for i in 0..k {
                let j = rng.random_range(i..experts);
                chosen.swap(i, j);
            }
            ids.extend_from_slice(&chosen[..k]);
            weights.extend((0..k).map(|_| rng.random_range(0.1f32..1.0)));
        }
        Self::aligned(tokens, k, ids, weights, experts, remote)
    }

    /// `counts[e]` pairs for each expert e (their sum a multiple of `k`), in random order, with weights in [0.1, 1) and
    /// the last `remote` experts and every seventh pair unrouted as [`RoutedBatch::random`] does: uneven experts, empty
    /// ones included. A token's pairs may repeat an expert (the kernels do not care).
    pub fn from_counts(rng: &mut StdRng, counts: &[usize], k: usize, remote: usize) -> Self {
        let pairs: usize = counts.iter().sum();
        assert_eq!(pairs % k, 0, "whole tokens");
        let mut ids: Vec<i32> = counts.iter().enumerate().flat_map(|(e, &c)| std::iter::repeat_n(e as i32, c)).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let weights = (0..pairs).map(|_| rng.random_range(0.1f32..1.0)).collect();
        Self::aligned(pairs / k, k, ids, weights, counts.len(), remote)
    }

    /// Every seventh pair (from the fourth) unrouted, the last `remote` of `experts` experts remote, the rest aligned
    /// into 64-slot tiles.
    fn aligned(tokens: usize, k: usize, mut ids: Vec<i32>, weights: Vec<f32>, experts: usize, remote: usize) -> Self {
        let local = experts - remote;
        ids.iter_mut().skip(3).step_by(7).for_each(|id| *id = -1);
        let expert_map: Vec<i32> = (0..experts).map(|e| if e < local { e as i32 } else { -1 }).collect();
        let tile_m = moe::moe_tile_m(tokens, k, local);
        assert_eq!(tile_m, 64, "a prefill-sized batch");
        let alignment = align_pairs(&ids, Some(&expert_map), local, tile_m);
        RoutedBatch { tokens, k, ids, weights, tile_m, alignment }
    }

    /// Slots of the aligned layout, padding included.
    pub fn capacity(&self) -> usize {
        self.alignment.sorted_pairs.len()
    }

    /// The local expert of `slot`.
    pub fn slot_expert(&self, slot: usize) -> usize {
        self.alignment.tile_experts[slot / self.tile_m] as usize
    }

    /// The slots that hold a pair, in slot order.
    pub fn routed_slots(&self) -> Vec<usize> {
        (0..self.capacity()).filter(|&s| self.alignment.sorted_pairs[s] >= 0).collect()
    }

    /// The padding slots (no pair): the grouped up-projection must leave their rows untouched.
    pub fn padding_slots(&self) -> Vec<usize> {
        (0..self.capacity()).filter(|&s| self.alignment.sorted_pairs[s] < 0).collect()
    }

    /// The pairs without a slot (unrouted, or on another GPU): the grouped down-projection must leave their rows
    /// untouched. Asserts the batch has some.
    pub fn unslotted_pairs(&self) -> Vec<usize> {
        let pairs: Vec<usize> = (0..self.tokens * self.k).filter(|&p| !self.alignment.sorted_pairs.contains(&(p as i32))).collect();
        assert!(!pairs.is_empty(), "the case has unrouted or remote pairs");
        pairs
    }
}

/// An [`Alignment`]'s arrays on the device; [`DeviceAlignment::grouping`] lends them to the grouped kernels.
pub struct DeviceAlignment {
    sorted_pairs: DeviceBuffer<i32>,
    tile_experts: DeviceBuffer<i32>,
    expert_offsets: DeviceBuffer<i32>,
    num_padded: DeviceBuffer<i32>,
    tile_m: usize,
}

impl DeviceAlignment {
    /// Uploads `alignment`, made for tiles of `tile_m` slots.
    pub fn upload(device: &Device, alignment: &Alignment, tile_m: usize) -> Self {
        let up = |v: &[i32]| DeviceBuffer::from_slice(device, v).unwrap();
        DeviceAlignment {
            sorted_pairs: up(&alignment.sorted_pairs),
            tile_experts: up(&alignment.tile_experts),
            expert_offsets: up(&alignment.expert_offsets),
            num_padded: up(&[alignment.num_padded]),
            tile_m,
        }
    }

    /// The grouped kernels' view of the uploaded arrays.
    pub fn grouping(&self) -> Grouping<'_> {
        Grouping {
            sorted_pairs: &self.sorted_pairs,
            tile_experts: &self.tile_experts,
            expert_offsets: &self.expert_offsets,
            num_padded: &self.num_padded,
            tile_m: self.tile_m,
        }
    }
}
