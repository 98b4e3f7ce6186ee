//! The machine code of the GEMM kernels, read with `cuobjdump -sass` from the sm_90a cubins build.rs embeds: the
//! wgmma kernels (cuda/moe_gemm_wgmma.cu: bf16, int4 and nvfp4 weights, 64, 192 and 256 slots a block) run on Hopper's warpgroup tensor-core
//! instruction (HGMMA), the dense ones load their activations with TMA (UTMALDG) and the grouped ones do not, and the
//! mma.sync kernels
//! (cuda/moe_gemm.cu) stay on HMMA; the vision attention's wgmma kernel (cuda/vision_attention_wgmma.cu) runs both its
//! products on HGMMA and its mma.sync twin (cuda/vision.cu) on HMMA; so do the MLA prefill attention's wgmma kernels
//! (cuda/mla_attention_wgmma.cu) and their mma.sync twins (cuda/mla_attention.cu). The interpreter runs the PTX; this checks what ptxas made of it, without a GPU.
//!
//! cuobjdump and nvdisasm come from the pinned PyPI wheels that build.rs installs (`SMALL4_CUOBJDUMP`); when they
//! could not be provisioned the test fails and says why, it never skips.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use small4::device::KernelModule;
use small4::kernels::modules::{MLA_ATTENTION, MLA_ATTENTION_WGMMA, MOE_GEMM, MOE_GEMM_WGMMA, MOE_GEMM_WGMMA_FP8, VISION, VISION_ATTENTION_WGMMA};

/// `cuobjdump -sass` of `module`'s cubin, split by function: name -> its SASS lines.
fn sass_by_function(module: &KernelModule) -> BTreeMap<String, String> {
    let cuobjdump = env!("SMALL4_CUOBJDUMP");
    assert!(
        !cuobjdump.is_empty(),
        "cuobjdump could not be provisioned by build.rs (pinned wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm 13.5.37): {}",
        env!("SMALL4_SASS_TOOLS_ERROR")
    );
    let cuobjdump = Path::new(cuobjdump);
    assert!(cuobjdump.exists(), "{} is gone: rebuild (build.rs installs it again)", cuobjdump.display());
    let dir = tempfile::tempdir().unwrap();
    let cubin = dir.path().join(format!("{}.cubin", module.name));
    std::fs::write(&cubin, module.cubin).unwrap();
    // cuobjdump runs nvdisasm, which lies beside it.
    let output = Command::new(cuobjdump).arg("-sass").arg(&cubin).env("NVDISASM_PATH", cuobjdump.with_file_name("nvdisasm")).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "cuobjdump -sass {} failed: {}{text}", cubin.display(), String::from_utf8_lossy(&output.stderr));
    let mut functions = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = line.trim().strip_prefix("Function : ") {
            current = Some(name.trim().to_string());
            functions.insert(name.trim().to_string(), String::new());
        } else if let Some(name) = &current {
            let body = functions.get_mut(name).unwrap();
            body.push_str(line);
            body.push('\n');
        }
    }
    assert!(!functions.is_empty(), "no functions in cuobjdump's output:\n{text}");
    functions
}

/// Instructions of opcode `op` (with any modifiers: `HGMMA.64x64x16.F32.BF16`) in `sass`.
fn count(sass: &str, op: &str) -> usize {
    let dotted = format!("{op}.");
    sass.lines().filter(|l| l.split_whitespace().any(|t| t == op || t.starts_with(&dotted))).count()
}

#[test]
fn wgmma_kernels_use_hgmma_and_the_dense_ones_tma() {
    let wgmma = sass_by_function(&MOE_GEMM_WGMMA);
    let names: Vec<&String> = wgmma.keys().collect();
    // Per format: 64 slots a block (gather, TMA), then the wide kernels (256 slots, then 192; in name order).
    let expected: Vec<String> = ["bf16", "int4", "nvfp4"]
        .iter()
        .flat_map(|f| {
            ["_wgmma", "_wgmma_dense", "_wide256_wgmma", "_wide256_wgmma_dense", "_wide_wgmma", "_wide_wgmma_dense"].map(|entry| format!("moe_gemm_{f}{entry}"))
        })
        .collect();
    assert_eq!(names, expected.iter().collect::<Vec<_>>(), "the wgmma module's kernels");
    for (name, sass) in &wgmma {
        // Four m64n64k16 per stage, unrolled twice: at least 8.
        assert!(count(sass, "HGMMA") >= 8, "{name}: {} HGMMA", count(sass, "HGMMA"));
        assert_eq!(count(sass, "HMMA"), 0, "{name}: mma.sync in a wgmma kernel");
        // The 256-slot kernels move registers from the producer warpgroup to the consumers (setmaxnreg: USETMAXREG,
        // a release and a take in each role); the others keep ptxas's allocation.
        let setmaxnreg = count(sass, "USETMAXREG");
        if name.contains("_wide256_") {
            assert!(setmaxnreg >= 2, "{name}: {setmaxnreg} USETMAXREG");
        } else {
            assert_eq!(setmaxnreg, 0, "{name}: USETMAXREG in a kernel without a producer warpgroup");
        }
        // The weights come by bulk copy (cp.async.bulk) in all.
        assert!(count(sass, "UBLKCP") >= 1, "{name}: no bulk copy of the weights");
        if name.ends_with("_dense") {
            assert!(count(sass, "UTMALDG") >= 1, "{name} loads its activations with TMA: no UTMALDG");
            assert_eq!(count(sass, "LDGSTS"), 0, "{name} gathers nothing with cp.async (LDGSTS)");
        } else {
            assert_eq!(count(sass, "UTMALDG"), 0, "{name} gathers its rows");
            assert!(count(sass, "LDGSTS") >= 1, "{name}'s gather is cp.async (LDGSTS)");
        }
    }
}

#[test]
fn mma_sync_kernels_use_hmma_not_hgmma() {
    let mma = sass_by_function(&MOE_GEMM);
    let tiles: Vec<(&String, &String)> = mma
        .iter()
        .filter(|(name, _)| ["_tiled", "_small", "_narrow", "_narrow_split", "_decode", "_decode_w2", "_decode_split"].iter().any(|s| name.ends_with(s)))
        .collect();
    assert!(tiles.iter().any(|(name, _)| *name == "moe_gemm_bf16_tiled"), "the kernel the wgmma one replaces: {:?}", mma.keys());
    for (name, sass) in tiles {
        assert!(count(sass, "HMMA") >= 1, "{name}: no HMMA");
        assert_eq!(count(sass, "HGMMA"), 0, "{name}: HGMMA in an mma.sync kernel");
    }
}

#[test]
fn vision_attention_wgmma_uses_hgmma_and_its_twin_hmma() {
    let wgmma = sass_by_function(&VISION_ATTENTION_WGMMA);
    let sass = wgmma.get("vision_attention_wgmma").unwrap_or_else(|| panic!("no vision_attention_wgmma in {:?}", wgmma.keys()));
    // Per key tile: four m64n64k16 for S = Q K^T and four for O += P V.
    assert!(count(sass, "HGMMA") >= 8, "vision_attention_wgmma: {} HGMMA", count(sass, "HGMMA"));
    assert_eq!(count(sass, "HMMA"), 0, "vision_attention_wgmma: mma.sync in the wgmma kernel");
    let vision = sass_by_function(&VISION);
    let twin = vision.get("vision_attention").unwrap_or_else(|| panic!("no vision_attention in {:?}", vision.keys()));
    assert!(count(twin, "HMMA") >= 1 && count(twin, "HGMMA") == 0, "vision_attention stays on mma.sync");
}

#[test]
fn fp8_activation_kernels_use_qgmma() {
    let fp8 = sass_by_function(&MOE_GEMM_WGMMA_FP8);
    for name in ["moe_gemm_fp8_wgmma_a8", "moe_gemm_fp8_block_wgmma_a8"] {
        let sass = fp8.get(name).unwrap_or_else(|| panic!("no {name} in {:?}", fp8.keys()));
        // Four m64n64k32 e4m3 per stage on the fp8 tensor cores (QGMMA), none on the 16-bit ones.
        assert!(count(sass, "QGMMA") >= 4, "{name}: {} QGMMA", count(sass, "QGMMA"));
        assert_eq!(count(sass, "HGMMA") + count(sass, "HMMA"), 0, "{name}: 16-bit tensor instructions in the fp8 kernel");
        assert!(count(sass, "UBLKCP") >= 1, "{name}: no bulk copy of the weights");
        assert!(count(sass, "LDGSTS") >= 1, "{name}'s gather is cp.async (LDGSTS)");
    }
    let quantiser = fp8.get("moe_quantize_act_e4m3_block128").expect("the quantiser");
    assert!(count(quantiser, "F2FP") >= 1, "the quantiser converts with F2FP (cvt.rn.satfinite.e4m3x2.f32)");
}

#[test]
fn mla_attention_wgmma_uses_hgmma_and_its_twin_hmma() {
    let wgmma = sass_by_function(&MLA_ATTENTION_WGMMA);
    let twins = sass_by_function(&MLA_ATTENTION);
    for dtype in ["bf16", "fp8"] {
        let name = format!("mla_attention_wgmma_{dtype}");
        let sass = wgmma.get(&name).unwrap_or_else(|| panic!("no {name} in {:?}", wgmma.keys()));
        // Per key tile: twenty m64n32k16 for S = Q K^T and two m64n256k16 for O += P V.
        assert!(count(sass, "HGMMA") >= 22, "{name}: {} HGMMA", count(sass, "HGMMA"));
        assert_eq!(count(sass, "HMMA"), 0, "{name}: mma.sync in the wgmma kernel");
        let twin_name = format!("mla_attention_{dtype}");
        let twin = twins.get(&twin_name).unwrap_or_else(|| panic!("no {twin_name} in {:?}", twins.keys()));
        assert!(count(twin, "HMMA") >= 1 && count(twin, "HGMMA") == 0, "{twin_name} stays on mma.sync");
    }
}
