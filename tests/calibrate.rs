//! `small4 calibrate` on a small subset of the stored H200 rows (the router at T=1 and T=32 with its before/after
//! pair, and the MoE bf16 batch-1 up GEMM before/after the BM 128 -> 64 change): every prediction finite and positive,
//! the summary line in its exact format and consistent with the rows printed. The full run's output is in
//! docs/perf.md ("Timing model").

use small4::calibrate::{self, parse_rows, Options, H200_DATA};

#[test]
fn calibration_subset_prints_rows_and_the_summary_line() {
    let options = Options { sample_blocks: 4, only: vec!["router-t1".into(), "router-t32".into(), "moe-bf16-t1-up".into()], ..Options::default() };
    let mut out = Vec::new();
    let (outcomes, summary) = calibrate::run(&options, &mut out).expect("the subset replays on the interpreter");
    let text = String::from_utf8(out).unwrap();

    // Every selected row with a run was predicted; the sync rows are data only.
    let rows = parse_rows(H200_DATA).unwrap();
    let runnable = rows.iter().filter(|r| r.run.is_some() && options.only.iter().any(|o| r.id.contains(o.as_str()))).count();
    assert_eq!(outcomes.len(), runnable);
    assert!(outcomes.len() >= 8, "{text}");
    for o in &outcomes {
        assert!(o.predicted_us.is_finite() && o.predicted_us > 0.0, "{}: {}", o.row.id, o.predicted_us);
        assert!(!o.launches.is_empty());
        assert!(text.contains(&format!("| {} | ", o.row.id)));
    }
    // The sampled MoE GEMM launches ran 4 of their blocks; the router is never sampled.
    let moe = outcomes.iter().find(|o| o.row.id == "moe-bf16-t1-up-bm64-ncu").unwrap();
    assert_eq!((moe.launches[0].kernel.as_str(), moe.launches[0].blocks, moe.launches[0].blocks_run), ("moe_gemm_bf16_narrow", 256, 4));
    assert!(outcomes.iter().filter(|o| o.row.id.starts_with("router")).all(|o| o.launches.iter().all(|l| l.blocks_run == l.blocks)));

    // The last line is the summary, in the exact format, and agrees with the returned figures.
    let last = text.lines().last().unwrap();
    assert_eq!(last, summary.to_string());
    let rest = last.strip_prefix("calibration: median abs error ").expect(last);
    let (median, rest) = rest.split_once("%, worst ratio ").expect(last);
    let (worst, rest) = rest.split_once(", ").expect(last);
    let (n, rest) = rest.split_once(" rows, ").expect(last);
    let (pairs, rest) = rest.split_once(' ').expect(last);
    assert_eq!(rest, "before-after pairs in the right direction");
    let (right, total) = pairs.split_once('/').expect(last);
    assert!(median.parse::<f64>().unwrap() >= 0.0);
    assert!(worst.parse::<f64>().unwrap() >= 1.0);
    assert_eq!(n.parse::<usize>().unwrap(), outcomes.len());
    // Pairs: router T=32 (criterion and ncu) and the MoE up GEMM at batch 1.
    assert_eq!(total.parse::<usize>().unwrap(), 3);
    assert!(right.parse::<usize>().unwrap() <= 3);
}

#[test]
fn a_bad_configuration_is_a_typed_error() {
    assert!(matches!(
        parse_rows("id\twhat\tmeasured_us\tmethod\tcode_state\trun\tpair\tsource\nx\ty\tfast\tncu\tnow\t-\t\tz\n"),
        Err(small4::Error::InvalidArgument(_))
    ));
    assert!(matches!(
        parse_rows("id\twhat\tmeasured_us\tmethod\tcode_state\trun\tpair\tsource\nx\ty\t1\tstopwatch\tnow\t-\t\tz\n"),
        Err(small4::Error::InvalidArgument(_))
    ));
    assert!(matches!(
        parse_rows("id\twhat\tmeasured_us\tmethod\tcode_state\trun\tpair\tsource\nx\ty\t1\tncu\tnow\t-\tp:during\tz\n"),
        Err(small4::Error::InvalidArgument(_))
    ));
}

#[test]
fn predict_cases_prints_both_gpus_and_names_bad_lists() {
    let list = "id\trun\tmethod\twhat\nr1\trouter tokens=1\tback-to-back\trouter T=1\nr1-ncu\trouter tokens=1 kernel=router_topk_decode\tncu\tkernel alone\n";
    let mut out = Vec::new();
    let results = calibrate::predict_cases(list, &Options::default(), &mut out).expect("the router replays");
    let text = String::from_utf8(out).unwrap();
    assert_eq!(results.len(), 2, "{text}");
    for (case, h200, h100) in &results {
        assert!(h200.is_finite() && *h200 > 0.0 && h100.is_finite() && *h100 > 0.0, "{}: {h200} {h100}", case.id);
        assert!(text.contains(&format!("| {} | {h200:.1} µs | {h100:.1} µs |", case.id)), "{text}");
    }
    // The back-to-back call pays its launch overhead, the ncu kernel duration does not.
    assert!(results[0].1 > results[1].1);
    let options = Options { predict: Some("everything".into()), ..Options::default() };
    assert!(matches!(calibrate::run_command(&options, &mut Vec::new()), Err(small4::Error::InvalidArgument(_))));
    assert!(calibrate::parse_cases("id\trun\tmethod\twhat\nx\trouter tokens=1\tback-to-back\n").is_err());
}

/// MLA cases: `combine=auto` replays the form the code picks (one launch at batch 1), `combine=launch` two, another
/// value is a typed error; `--predict` also takes the path of a case file.
#[test]
fn mla_cases_take_the_codes_combine_form_and_a_case_file() {
    let list = "id\trun\tmethod\twhat\n\
                auto\tmla batch=1 ctx=256 dtype=bf16 combine=auto\twith-sync\tthe code's form\n\
                launch\tmla batch=1 ctx=256 dtype=bf16 combine=launch\twith-sync\ttwo launches\n";
    let mut out = Vec::new();
    let results = calibrate::predict_cases(list, &Options::default(), &mut out).expect("MLA replays");
    let text = String::from_utf8(out).unwrap();
    assert_eq!(results.len(), 2, "{text}");
    // Batch 1 at 256 tokens: 4 row tiles of 8 heads (the half-warp tiles of the smallest grids,
    // `AttentionPlan::tile_rows`) x 2 splits of 128 tokens, the combine fused.
    assert!(text.lines().any(|l| l.starts_with("| auto |") && l.contains("| mla_attention_bf16 8 |")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("| launch |") && l.contains("mla_attention_combine")), "{text}");
    let bad = "id\trun\tmethod\twhat\nx\tmla batch=1 ctx=256 dtype=bf16 combine=sideways\twith-sync\tx\n";
    assert!(matches!(calibrate::predict_cases(bad, &Options::default(), &mut Vec::new()), Err(small4::Error::InvalidArgument(_))));

    let path = std::env::temp_dir().join(format!("small4-calibrate-cases-{}.tsv", std::process::id()));
    std::fs::write(&path, list).unwrap();
    let options = Options { predict: Some(path.display().to_string()), only: vec!["auto".into()], ..Options::default() };
    let mut out = Vec::new();
    calibrate::run_command(&options, &mut out).expect("a case file predicts");
    std::fs::remove_file(&path).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.lines().any(|l| l.starts_with("| auto |")) && !text.contains("| launch |"), "{text}");
}

/// The MLA prefill on both kernels (`mla_prefill ... attention=`): each case replays the kernel it names (the launches
/// column), the default is the mma.sync kernel the stored measurement ran, a forced split count and the fused combine
/// replay on the wgmma kernel too, a decode (`mla`) case with `attention=wgmma` replays the wgmma kernel (the wrapper
/// never picks it at decode), and an unknown choice is a typed error.
#[test]
fn mla_prefill_cases_replay_the_kernel_they_name() {
    let list = "id\trun\tmethod\twhat\n\
                p-default\tmla_prefill new=16 prefix=16\twith-sync\tdefault\n\
                p-mma\tmla_prefill new=16 prefix=16 attention=mma_sync\twith-sync\tmma.sync\n\
                p-wgmma\tmla_prefill new=16 prefix=16 attention=wgmma\twith-sync\twgmma\n\
                p-split\tmla_prefill new=16 prefix=48 attention=wgmma splits=2 combine=fused\twith-sync\twgmma split\n\
                d-wgmma\tmla batch=1 ctx=64 attention=wgmma combine=auto\twith-sync\twgmma decode\n";
    let mut out = Vec::new();
    let results = calibrate::predict_cases(list, &Options { sample_blocks: 2, ..Options::default() }, &mut out).expect("both kernels replay");
    assert_eq!(results.len(), 5);
    let text = String::from_utf8(out).unwrap();
    let row = |id: &str| text.lines().find(|l| l.starts_with(&format!("| {id} | "))).unwrap_or_else(|| panic!("no {id} row in {text}")).to_string();
    for id in ["p-default", "p-mma"] {
        assert!(row(id).contains("| mla_attention_bf16 ") && !row(id).contains("wgmma"), "{}", row(id));
    }
    for id in ["p-wgmma", "p-split", "d-wgmma"] {
        assert!(row(id).contains("| mla_attention_wgmma_bf16 ") && !row(id).contains("combine"), "{}", row(id));
    }
    for bad in ["mla_prefill new=16 prefix=16 attention=fast", "mla batch=1 ctx=64 attention=tensor_cores"] {
        let list = format!("id\trun\tmethod\twhat\nx\t{bad}\twith-sync\tx\n");
        assert!(matches!(calibrate::predict_cases(&list, &Options::default(), &mut Vec::new()), Err(small4::Error::InvalidArgument(_))), "{bad}");
    }
}

/// The vision attention on both tensor-core paths (`attention=`): the wgmma kernel's tensor FLOPs are all wgmma
/// FLOPs and take the wgmma rate (its prediction follows `wgmma_efficiency`, the mma.sync kernel's does not); the
/// table carries the H100 SXM tensor and DRAM rates; a recorded profile file (which holds the new counters) gives
/// the same predictions back; an unknown kernel choice is a typed error.
#[test]
fn wgmma_cases_are_counted_apart_and_take_the_wgmma_rate() {
    use half::bf16;
    use small4::device::{simulator, DeviceBuffer, TargetGpu, TimingModel};
    use small4::kernels::vision::{vision_attention, TokenSegments, VisionAttentionKernel};

    let list = "id\trun\tmethod\twhat\n\
                v-mma\tvision_attention tokens=256 attention=mma_sync\tncu\tmma.sync\n\
                v-wgmma\tvision_attention tokens=256 attention=wgmma\tncu\twgmma\n";
    let profiles = std::env::temp_dir().join(format!("small4-calibrate-wgmma-{}.tsv", std::process::id()));
    let _ = std::fs::remove_file(&profiles);
    let options = Options { sample_blocks: 4, profiles: Some(profiles.clone()), ..Options::default() };
    let mut out = Vec::new();
    let results = calibrate::predict_cases(list, &options, &mut out).expect("both kernels replay");
    let text = String::from_utf8(out).unwrap();
    assert!(text.lines().next().unwrap().ends_with("| tensor TFLOP/s (H100 SXM) | DRAM (H100 SXM) |"), "{text}");
    for (case, h200, h100) in &results {
        let line = text.lines().find(|l| l.starts_with(&format!("| {} | ", case.id))).expect("a row per case");
        assert!(line.contains("% of HBM) |") && h200.is_finite() && h100.is_finite(), "{line}");
    }

    // The recorded profiles hold the new counters: read back, the same predictions, and the launches to inspect.
    let mut again = Vec::new();
    let reread = calibrate::predict_cases(list, &options, &mut again).expect("read from the profiles file");
    let _ = std::fs::remove_file(&profiles);
    assert_eq!(reread, results);
    let bad = "id\trun\tmethod\twhat\nx\tvision_attention tokens=256 attention=fast\tncu\tx\n";
    assert!(matches!(calibrate::predict_cases(bad, &Options::default(), &mut Vec::new()), Err(small4::Error::InvalidArgument(_))));
    let bad = "id\trun\tmethod\twhat\nx\tmoe format=bf16 tokens=1 gemm=fast\tncu\tx\n";
    assert!(matches!(calibrate::predict_cases(bad, &Options::default(), &mut Vec::new()), Err(small4::Error::InvalidArgument(_))));

    // Each kernel's counters: the wgmma kernel's tensor FLOPs are all wgmma (16-bit) FLOPs, the mma.sync kernel's
    // none. A model with an eighth of the wgmma efficiency multiplies the wgmma launch's tensor term by 8 and leaves
    // the mma.sync launch's alone.
    let counters = |kernel: VisionAttentionKernel| {
        let device = simulator();
        let x: Vec<bf16> = (0..256 * 2 * 64).map(|i| bf16::from_f32((i % 7) as f32 / 8.0)).collect();
        let x = DeviceBuffer::from_slice(&device, &x).unwrap();
        let out = DeviceBuffer::<bf16>::alloc(&device, 256 * 2 * 64).unwrap();
        let segments = TokenSegments::upload(&device, std::slice::from_ref(&(0..256))).unwrap();
        let view = x.view([256, 2, 64]).unwrap();
        kernel.run(|| vision_attention(view, view, view, out.view([256, 2, 64])?, &segments, 0.125)).expect("runs");
        device.last_launch_counters().expect("a launch")
    };
    let (mma, wgmma) = (counters(VisionAttentionKernel::MmaSync), counters(VisionAttentionKernel::Wgmma));
    assert_eq!((mma.kernel.as_str(), wgmma.kernel.as_str()), ("vision_attention", "vision_attention_wgmma"));
    assert!(mma.timing.tensor_flops > 0 && mma.timing.wgmma_flops == 0);
    assert!(wgmma.timing.tensor_flops > 0 && wgmma.timing.wgmma_flops == wgmma.timing.tensor_flops && wgmma.timing.wgmma_8bit_flops == 0);
    let slow = TimingModel { wgmma_efficiency: TimingModel::FITTED.wgmma_efficiency / 8.0, ..TimingModel::FITTED };
    let tensor = |l: &small4::device::LaunchCounters, model: &TimingModel| l.predict(&TargetGpu::H100_SXM, model).tensor_s;
    assert_eq!(tensor(&mma, &slow), tensor(&mma, &TimingModel::FITTED));
    let ratio = tensor(&wgmma, &slow) / tensor(&wgmma, &TimingModel::FITTED);
    assert!((ratio - 8.0).abs() < 1e-9, "{ratio}");
}

/// `gemm=wgmma_fp8_act` replays an fp8 prefill-tile GEMM on the fp8 tensor cores: the activation quantiser, then
/// `moe_gemm_fp8_wgmma_a8` whose tensor FLOPs are all 8-bit wgmma FLOPs (the mma.sync replay of the same case runs
/// `moe_gemm_fp8_tiled`, with none); each case's `kernel=` picks its launch and both predict.
#[test]
fn fp8_act_gemm_cases_replay_on_the_fp8_tensor_cores() {
    let list = "id\trun\tmethod\twhat\n\
                f-mma\tdense format=fp8 rows=128 k=256 tokens=64 gemm=mma_sync kernel=moe_gemm_fp8_tiled\tncu\tmma.sync\n\
                f-quant\tdense format=fp8 rows=128 k=256 tokens=64 gemm=wgmma_fp8_act kernel=moe_quantize_act_e4m3_block128\tncu\tquantiser\n\
                f-a8\tdense format=fp8 rows=128 k=256 tokens=64 gemm=wgmma_fp8_act kernel=moe_gemm_fp8_wgmma_a8\tncu\tfp8 wgmma\n";
    let profiles = std::env::temp_dir().join(format!("small4-calibrate-fp8-act-{}.tsv", std::process::id()));
    let _ = std::fs::remove_file(&profiles);
    let options = Options { profiles: Some(profiles.clone()), ..Options::default() };
    let results = calibrate::predict_cases(list, &options, &mut Vec::new()).expect("the fp8 cases replay");
    let _ = std::fs::remove_file(&profiles);
    assert_eq!(results.len(), 3);
    for (case, h200, h100) in &results {
        assert!(h200.is_finite() && *h200 > 0.0 && h100.is_finite() && *h100 > 0.0, "{}: {h200} {h100}", case.id);
    }
    let counters = |choice: small4::kernels::moe_wgmma::PrefillGemm| {
        use small4::device::{simulator, DeviceBuffer};
        use small4::quant::{repack, QuantizedMatrix, WeightFormat};
        let device = simulator();
        let w = QuantizedMatrix::quantize(WeightFormat::Fp8PerTensor, &vec![0.25; 128 * 256], 128, 256).unwrap();
        let weights = small4::kernels::gemm::DeviceWeights::upload(&device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        let x = DeviceBuffer::from_slice(&device, &vec![half::bf16::from_f32(0.5); 64 * 256]).unwrap();
        let y = DeviceBuffer::<half::bf16>::alloc(&device, 64 * 128).unwrap();
        choice.run(|| small4::kernels::dense::linear(&weights, x.view([64, 256])?, y.view([64, 128])?)).expect("runs");
        device.last_launch_counters().expect("a launch")
    };
    let (mma, a8) = (counters(small4::kernels::moe_wgmma::PrefillGemm::MmaSync), counters(small4::kernels::moe_wgmma::PrefillGemm::WgmmaFp8Act));
    assert_eq!((mma.kernel.as_str(), a8.kernel.as_str()), ("moe_gemm_fp8_tiled", "moe_gemm_fp8_wgmma_a8"));
    assert_eq!((a8.timing.wgmma_8bit_flops, a8.timing.tensor_flops), (2 * 64 * 128 * 256, 2 * 64 * 128 * 256), "every FLOP of the fp8 kernel on 8-bit wgmma");
    assert!(mma.timing.tensor_flops > 0 && mma.timing.wgmma_flops == 0);
}

/// The decode kernel against the narrow tile it replaced at batch 1 (`moe::grouped_tile_shape`'s choice, cases
/// `moe-*-t1-decode` / `-narrow` of data/calibration/decode-choices.tsv): for every format the timing model predicts
/// the MoE layer (up + SwiGLU, down, combine; launch overheads included) faster on the decode kernel, on the H100 SXM
/// and the H200. Prints the table of docs/perf.md "The decode kernel". Minutes on the interpreter:
/// `cargo test --test calibrate decode_kernel_predicted -- --ignored --nocapture`.
#[test]
#[ignore = "the MoE layer at real sizes in six formats and two kernels: minutes on the interpreter"]
fn decode_kernel_predicted_faster_than_the_narrow_tile_at_batch_1() {
    let options = Options { only: vec!["-t1-decode".into(), "-t1-narrow".into()], ..Options::default() };
    let mut out = Vec::new();
    let results = calibrate::predict_cases(calibrate::DECODE_CHOICES, &options, &mut out).expect("the MoE layer replays");
    let text = String::from_utf8(out).unwrap();
    println!("{text}");
    let decode: Vec<_> = results.iter().filter(|(case, ..)| case.id.ends_with("-t1-decode")).collect();
    assert_eq!(decode.len(), 6, "{text}");
    for (case, h200, h100) in decode {
        let narrow_id = case.id.replace("-t1-decode", "-t1-narrow");
        let (_, narrow_h200, narrow_h100) = results.iter().find(|(c, ..)| c.id == narrow_id).unwrap_or_else(|| panic!("no {narrow_id}: {text}"));
        assert!(h100 < narrow_h100 && h200 < narrow_h200, "{}: decode {h100:.1} / {h200:.1} µs, narrow {narrow_h100:.1} / {narrow_h200:.1} µs", case.id);
    }
}
