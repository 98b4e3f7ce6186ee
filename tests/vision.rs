//! The vision tower's kernels (`cuda/vision.cu`), each against its piece of the CPU reference
//! (`reference::vision`), and their typed errors.

mod common;

use half::bf16;
use small4::device::{Device, DeviceBuffer};
use small4::kernels::vision::{
    bias_act, patch_im2col, patch_merge, rope_2d, scatter_rows, vision_attention, Activation, GridPositions, MergeSources, RowTargets, TokenSegments,
};
use small4::reference::vision::{apply_rope_2d, block_diagonal_attention, gelu, merge_patches, rope_2d_inv_freq, unfold_patches, PixelImage};
use small4::Error;

use common::{assert_close, random_bf16, rng, to_f32};

fn upload(device: &Device, values: &[bf16]) -> DeviceBuffer<bf16> {
    DeviceBuffer::from_slice(device, values).unwrap()
}

fn read(buffer: &DeviceBuffer<bf16>) -> Vec<f32> {
    to_f32(&buffer.to_vec().unwrap())
}

/// An output buffer filled with NaN (0xffff), so unwritten elements show.
fn poisoned(device: &Device, len: usize) -> DeviceBuffer<bf16> {
    upload(device, &vec![bf16::from_bits(0xffff); len])
}

fn image(width: usize, height: usize, seed: u64) -> PixelImage {
    let data = to_f32(&random_bf16(&mut rng(seed), 3 * width * height, 2.0));
    PixelImage { width, height, channels: 3, data }
}

fn patch_unfold_is_the_references_with_zero_padding(device: &Device) {
    let (p, k_padded) = (14, 640);
    let (a, b) = (image(56, 28, 1), image(28, 42, 2));
    let pixels: Vec<DeviceBuffer<f32>> = [&a, &b].iter().map(|i| DeviceBuffer::from_slice(device, &i.data).unwrap()).collect();
    let out = poisoned(device, (8 + 6) * k_padded);
    let rows = out.view([8 + 6, k_padded]).unwrap();
    let mut first = 0;
    for (img, px) in [&a, &b].iter().zip(&pixels) {
        let patches = (img.height / p) * (img.width / p);
        patch_im2col(px.view([3, img.height, img.width]).unwrap(), p, rows.rows(first..first + patches).unwrap()).unwrap();
        first += patches;
    }
    let got = read(&out);
    // Pixels that are bf16 values: the unfold moves them exactly.
    let want: Vec<f32> = [&a, &b]
        .iter()
        .flat_map(|img| {
            unfold_patches(img, p)
                .chunks(3 * p * p)
                .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0.0, k_padded - 3 * p * p)))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(got, want);
    // A side that is not a multiple of the patch, a pixel view past its buffer, an output with room for fewer
    // patches (or more), rows too short for a patch, rows that are not packed: typed errors.
    let bad = pixels[0].view([3, 28, 50]).unwrap();
    assert!(matches!(patch_im2col(bad, p, rows.rows(0..8).unwrap()), Err(Error::Shape { .. })));
    assert!(matches!(pixels[1].view([3, 28, 56]), Err(Error::Shape { .. })));
    let whole = pixels[0].view([3, 28, 56]).unwrap();
    assert!(matches!(patch_im2col(whole, p, rows.rows(7..14).unwrap()), Err(Error::Shape { .. })));
    assert!(matches!(patch_im2col(whole, p, rows.rows(0..9).unwrap()), Err(Error::Shape { .. })));
    assert!(matches!(patch_im2col(whole, p, out.view([8, 500]).unwrap()), Err(Error::InvalidArgument(_))));
    assert!(matches!(patch_im2col(whole, p, rows.rows(0..8).unwrap().columns(0..600).unwrap()), Err(Error::InvalidArgument(_))));
}

fn rope_2d_matches_the_reference(device: &Device) {
    let (heads, head_dim) = (2, 64);
    let grid = [(0usize, 0usize), (0, 1), (3, 2), (7, 109), (109, 5), (54, 54)];
    let tokens = grid.len();
    let mut r = rng(3);
    let (q, k) = (random_bf16(&mut r, tokens * heads * head_dim, 2.0), random_bf16(&mut r, tokens * heads * head_dim, 2.0));
    let (q_dev, k_dev) = (upload(device, &q), upload(device, &k));
    let inv_freq = rope_2d_inv_freq(head_dim, 1e4);
    let rows = DeviceBuffer::from_slice(device, &grid.iter().map(|g| g.0 as i32).collect::<Vec<_>>()).unwrap();
    let cols = DeviceBuffer::from_slice(device, &grid.iter().map(|g| g.1 as i32).collect::<Vec<_>>()).unwrap();
    let (fr, fc) = (DeviceBuffer::from_slice(device, &inv_freq.0).unwrap(), DeviceBuffer::from_slice(device, &inv_freq.1).unwrap());
    let positions = GridPositions { rows: &rows, cols: &cols, inv_freq_rows: &fr, inv_freq_cols: &fc };
    let shape = [tokens, heads, head_dim];
    rope_2d(q_dev.view(shape).unwrap(), Some(k_dev.view(shape).unwrap()), &positions).unwrap();
    for (what, input, got) in [("q", &q, read(&q_dev)), ("k", &k, read(&k_dev))] {
        let mut want = to_f32(input);
        for (t, token) in want.chunks_mut(heads * head_dim).enumerate() {
            token.chunks_mut(head_dim).for_each(|h| apply_rope_2d(h, &inv_freq, grid[t].0, grid[t].1));
        }
        // One bf16 rounding of values up to ~2.8 (2^-8 relative).
        assert_close(&format!("rope_2d {what}"), &got, &want, 1e-3, 8e-3);
    }
    // Heads of 32 (frequencies are for 64), a k of other dims, one token short of the grid, heads of 62.
    assert!(matches!(rope_2d(q_dev.view([tokens, 2 * heads, 32]).unwrap(), None, &positions), Err(Error::Shape { .. })));
    assert!(matches!(rope_2d(q_dev.view(shape).unwrap(), Some(k_dev.view([tokens, 1, head_dim]).unwrap()), &positions), Err(Error::Shape { .. })));
    assert!(matches!(rope_2d(q_dev.view([tokens - 1, heads, head_dim]).unwrap(), None, &positions), Err(Error::Shape { .. })));
    assert!(matches!(rope_2d(q_dev.view([tokens, 1, 62]).unwrap(), None, &positions), Err(Error::InvalidArgument(_))));
}

fn block_diagonal_attention_matches_the_reference(device: &Device) {
    // Three images over three 64-query tiles: the 145-token one spans all three and three 64-key tiles (the online
    // softmax rescales across key tiles), shares its first and last query tiles with the others, and the last tile
    // is partial.
    let (heads, head_dim) = (2, 64);
    let segments = [0..5, 5..150, 150..170];
    let tokens = 170;
    let mut r = rng(4);
    let [q, k, v] = [0, 1, 2].map(|_| random_bf16(&mut r, tokens * heads * head_dim, 1.5));
    let out = poisoned(device, tokens * heads * head_dim);
    let token_segments = TokenSegments::upload(device, &segments).unwrap();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let shape = [tokens, heads, head_dim];
    let [q_dev, k_dev, v_dev] = [&q, &k, &v].map(|x| upload(device, x));
    vision_attention(q_dev.view(shape).unwrap(), k_dev.view(shape).unwrap(), v_dev.view(shape).unwrap(), out.view(shape).unwrap(), &token_segments, scale)
        .unwrap();
    let want = block_diagonal_attention(&to_f32(&q), &to_f32(&k), &to_f32(&v), &segments, heads, head_dim);
    // Outputs are averages of values below 1.5: f32 softmax, one bf16 rounding.
    assert_close("vision attention", &read(&out), &want, 2e-3, 8e-3);

    assert!(matches!(TokenSegments::upload(device, &[0..5, 6..9]), Err(Error::InvalidArgument(_))));
    assert!(matches!(TokenSegments::upload(device, std::slice::from_ref(&(0..0))), Err(Error::InvalidArgument(_))));
    // Views of ten tokens for 170, an output of one head for two, heads of 32: typed errors.
    let short = q_dev.view([10, heads, head_dim]).unwrap();
    assert!(matches!(vision_attention(short, short, short, out.view(shape).unwrap(), &token_segments, scale), Err(Error::Shape { .. })));
    let one_head = out.view([tokens, 1, head_dim]).unwrap();
    assert!(matches!(
        vision_attention(q_dev.view(shape).unwrap(), k_dev.view(shape).unwrap(), v_dev.view(shape).unwrap(), one_head, &token_segments, scale),
        Err(Error::Shape { .. })
    ));
    let narrow = q_dev.view([tokens, 2 * heads, 32]).unwrap();
    assert!(matches!(vision_attention(narrow, narrow, narrow, narrow, &token_segments, scale), Err(Error::Shape { .. })));
}

fn bias_gelu_matches_the_reference(device: &Device) {
    let (rows, cols) = (5, 96);
    let mut r = rng(5);
    let (x, bias) = (random_bf16(&mut r, rows * cols, 4.0), random_bf16(&mut r, cols, 1.0));
    let x_dev = upload(device, &x);
    let bias_dev = upload(device, &bias);
    bias_act(x_dev.view([rows, cols]).unwrap(), Some(bias_dev.as_vector()), Activation::Gelu).unwrap();
    let want: Vec<f32> = to_f32(&x).iter().enumerate().map(|(i, &v)| gelu(v + bias[i % cols].to_f32())).collect();
    assert_close("bias + gelu", &read(&x_dev), &want, 1e-3, 8e-3);
    let y_dev = upload(device, &x);
    bias_act(y_dev.view([rows, cols]).unwrap(), Some(bias_dev.as_vector()), Activation::Identity).unwrap();
    let want: Vec<f32> = to_f32(&x).iter().enumerate().map(|(i, &v)| v + bias[i % cols].to_f32()).collect();
    assert_close("bias", &read(&y_dev), &want, 1e-3, 8e-3);
    // A bias of 10 for rows of 96, rows that are not packed.
    assert!(matches!(bias_act(x_dev.view([rows, cols]).unwrap(), Some(bias_dev.view([10]).unwrap()), Activation::Gelu), Err(Error::Shape { .. })));
    let strided = x_dev.view([rows, cols]).unwrap().columns(0..cols - 8).unwrap();
    assert!(matches!(bias_act(strided, None, Activation::Gelu), Err(Error::InvalidArgument(_))));
}

fn patch_merge_is_the_references_unfold(device: &Device) {
    let (hidden, merge) = (24, 2);
    let grids = [(4usize, 6usize), (2, 2), (6, 4)];
    let tokens: usize = grids.iter().map(|(r, c)| r * c).sum();
    let x = random_bf16(&mut rng(6), tokens * hidden, 3.0);
    let sources = MergeSources::upload(device, &grids, merge).unwrap();
    assert_eq!(sources.rows(), 6 + 1 + 6);
    let out = poisoned(device, sources.rows() * hidden * 4);
    let x_dev = upload(device, &x);
    let out_rows = out.view([sources.rows(), hidden * 4]).unwrap();
    patch_merge(x_dev.view([tokens, hidden]).unwrap(), &sources, out_rows).unwrap();
    let xf = to_f32(&x);
    let mut want = Vec::new();
    let mut first = 0;
    for &(rows, cols) in &grids {
        want.extend(merge_patches(&xf[first * hidden..(first + rows * cols) * hidden], rows, cols, hidden, merge));
        first += rows * cols;
    }
    assert_eq!(read(&out), want);
    assert!(matches!(MergeSources::upload(device, &[(3, 4)], merge), Err(Error::Shape { .. })));
    // One token for the grids' 52, an output one row short.
    assert!(matches!(patch_merge(x_dev.view([1, hidden]).unwrap(), &sources, out_rows), Err(Error::Shape { .. })));
    let short = out.view([sources.rows() - 1, hidden * 4]).unwrap();
    assert!(matches!(patch_merge(x_dev.view([tokens, hidden]).unwrap(), &sources, short), Err(Error::Shape { .. })));
}

fn scatter_rows_writes_only_the_targets(device: &Device) {
    let (rows, cols) = (9, 40);
    let mut r = rng(7);
    let (base, src) = (random_bf16(&mut r, rows * cols, 1.0), random_bf16(&mut r, 3 * cols, 1.0));
    let out = upload(device, &base);
    let targets = [7usize, 2, 3];
    let src_dev = upload(device, &src);
    scatter_rows(src_dev.view([3, cols]).unwrap(), &RowTargets::upload(device, &targets, rows).unwrap(), out.view([rows, cols]).unwrap()).unwrap();
    let mut want = to_f32(&base);
    for (i, &t) in targets.iter().enumerate() {
        want[t * cols..(t + 1) * cols].copy_from_slice(&to_f32(&src[i * cols..(i + 1) * cols]));
    }
    assert_eq!(read(&out), want);
    assert!(matches!(RowTargets::upload(device, &[1, 9], rows), Err(Error::OutOfRange { .. })));
    assert!(matches!(RowTargets::upload(device, &[1, 1], rows), Err(Error::InvalidArgument(_))));
    let two = RowTargets::upload(device, &[0, 1], rows).unwrap();
    // Three source rows for two targets, an output shorter than the targets' limit.
    assert!(matches!(scatter_rows(src_dev.view([3, cols]).unwrap(), &two, out.view([rows, cols]).unwrap()), Err(Error::Shape { .. })));
    assert!(matches!(scatter_rows(src_dev.view([2, cols]).unwrap(), &two, out.view([rows - 1, cols]).unwrap()), Err(Error::Shape { .. })));
}

backend_tests!(
    patch_unfold_is_the_references_with_zero_padding,
    rope_2d_matches_the_reference,
    block_diagonal_attention_matches_the_reference,
    bias_gelu_matches_the_reference,
    patch_merge_is_the_references_unfold,
    scatter_rows_writes_only_the_targets,
);
