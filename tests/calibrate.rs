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
    let list = "id\trun\tmethod\twhat\nr1\trouter tokens=1\tback-to-back\trouter T=1\nr1-ncu\trouter tokens=1 kernel=router_topk\tncu\tkernel alone\n";
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
    // Batch 1 at 256 tokens: 2 row tiles of 16 heads x 2 splits of 128 tokens, the combine fused.
    assert!(text.lines().any(|l| l.starts_with("| auto |") && l.ends_with("| mla_attention_bf16 4 |")), "{text}");
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
