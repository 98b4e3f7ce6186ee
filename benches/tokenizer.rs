//! Encode throughput (MB/s of UTF-8 input) of our tekken BPE against the `tekken` crate alone, on the same
//! tekken_240911 vocabulary: `cargo bench --bench tokenizer`. Figures go to docs/perf.md, "Tokenizer throughput".

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use small4::tokenizer::bpe::Splitter;
use small4::tokenizer::{Tokenizer, TEKKEN_240911_PATH};

/// About `bytes` of mixed text, the same on every run: English words, capitalised names, numbers, punctuation,
/// code, accented Latin, Cyrillic, CJK, emoji, and runs of spaces and newlines.
fn mixed_text(bytes: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "tokenizer",
        "reasoning",
        "Mistral",
        "Small",
        "expert",
        "attention",
        "weights",
        "between",
        "naïve",
        "café",
        "Übergröße",
        "déjà",
        "привет",
        "мир",
        "模型",
        "推理",
        "東京",
        "😀",
        "🚀",
        "fn",
        "main()",
        "{",
        "}",
        "=>",
        "let",
        "x",
        "=",
        "vec![1,",
        "2];",
        "//",
        "comment",
        "https://example.com/a?b=c",
        "#include",
        "<stdio.h>",
        "\"quoted\"",
        "(parenthesised)",
        "e.g.",
        "U.S.",
        "3.14159",
        "2026-11-23",
        "1,234,567",
    ];
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut text = String::with_capacity(bytes + 64);
    while text.len() < bytes {
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        text.push_str(match rng.random_range(0..20) {
            0 => "\n",
            1 => "\n\n",
            2 => "    ",
            3 => ", ",
            4 => ". ",
            _ => " ",
        });
    }
    text
}

fn encode_throughput(c: &mut Criterion) {
    let ours = Tokenizer::from_file(TEKKEN_240911_PATH).expect("provisioned tekken_240911.json");
    let crate_alone = tekken::Tekkenizer::from_file(TEKKEN_240911_PATH).expect("tekken crate loads the same file");
    let text = mixed_text(4 << 20);
    assert_eq!(ours.encode(&text, false, false), crate_alone.encode(&text, false, false).unwrap());

    let mut group = c.benchmark_group("encode_mixed_4MiB");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("small4", |b| b.iter(|| ours.encode(&text, false, false)));
    group.bench_function("tekken_crate", |b| b.iter(|| crate_alone.encode(&text, false, false).unwrap()));
    // The split alone, both ways, to see where the encode time goes.
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(TEKKEN_240911_PATH).unwrap()).unwrap();
    let pattern = file["config"]["pattern"].as_str().unwrap();
    for (name, splitter) in [("split_regex_crate", Splitter::new(pattern).unwrap()), ("split_fancy_regex", Splitter::general(pattern).unwrap())] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut pieces = 0usize;
                splitter.for_each_piece(&text, |_| pieces += 1);
                pieces
            })
        });
    }
    group.finish();

    // One piece with no space: the regex gives it whole to the merge loop.
    let mut group = c.benchmark_group("encode_one_long_piece");
    group.sample_size(10);
    for len in [2_000usize, 20_000] {
        let word: String = "abcdefghij".chars().cycle().take(len).collect();
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("small4", len), &word, |b, w| b.iter(|| ours.encode(w, false, false)));
        group.bench_with_input(BenchmarkId::new("tekken_crate", len), &word, |b, w| b.iter(|| crate_alone.encode(w, false, false).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, encode_throughput);
criterion_main!(benches);
