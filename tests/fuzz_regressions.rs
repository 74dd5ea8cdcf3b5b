//! Every input the fuzzers (`fuzz/`, `make fuzz`) ever failed on, replayed
//! through the same property checks: `tests/data/fuzz-regressions/<target>/`.

#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::path::PathBuf;
use vlm_budget::core::probe::{probe, ImageFormat};
use vlm_budget::core::transcode::{decode, TranscodeError};

fn regressions(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz-regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let data = std::fs::read(e.path()).expect("readable regression input");
            (name, data)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_committed_input_passes_its_target_checks() {
    let mut replayed = 0;
    for (target, check) in checks::TARGETS {
        for (name, data) in regressions(target) {
            eprintln!("{target}/{name}");
            check(&data);
            replayed += 1;
        }
    }
    assert!(replayed >= 2, "the committed regression inputs were not found");
}

#[test]
fn every_regression_folder_names_a_target() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-regressions");
    for entry in std::fs::read_dir(root).expect("tests/data/fuzz-regressions") {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(
            checks::TARGETS.iter().any(|(t, _)| *t == name),
            "{name} is not a fuzz target"
        );
    }
}

/// A PNG whose header claims 150 x 1,677,721,600 pixels: `decode` must
/// refuse it by its pixel limit before allocating the output buffer (it
/// used to ask for 251 GB, which the fuzzer's allocator reported).
#[test]
fn png_decode_holds_the_pixel_limit_before_allocating() {
    let (_, data) = regressions("probe_decode")
        .into_iter()
        .find(|(n, _)| n == "png-header-above-pixel-limit")
        .expect("committed input");
    let header = probe(data.as_slice()).expect("the header reads");
    assert_eq!(
        (header.format, header.width, header.height),
        (ImageFormat::Png, 150, 1_677_721_600)
    );
    match decode(&data, &header, None, 1 << 18) {
        Err(TranscodeError::Decode(msg)) => assert!(msg.contains("pixel limit"), "{msg}"),
        other => panic!("expected a refusal by the pixel limit, got {other:?}"),
    }
}

/// `QQ=`-style partial padding: refused by the filter (as Python's
/// `b64decode` refuses it), though the `base64` crate's lenient engine
/// takes it. The check once wrongly called that a bug.
#[test]
fn partial_padding_is_refused() {
    use vlm_budget::core::base64buf::{Base64Error, Base64Payload};
    assert_eq!(
        Base64Payload::new(b"QQ=").err(),
        Some(Base64Error::InvalidPadding)
    );
    assert!(Base64Payload::new(b"QQ==").is_ok() && Base64Payload::new(b"QQ").is_ok());
}

/// The `offload_answer` target's property on the answers it must take and
/// the ones it must refuse (the fuzzer explores around these).
#[test]
fn offload_answer_check_runs_on_good_and_bad_answers() {
    use vlm_budget::core::transcode::{encode, Layout, Pixels};
    let px = Pixels {
        width: 56,
        height: 28,
        layout: Layout::Rgb8,
        data: vec![90; 56 * 28 * 3],
    };
    for (fmt, format) in [(0u8, ImageFormat::Png), (1, ImageFormat::Jpeg)] {
        let img = encode(&px, format, 90).expect("encode");
        for sel in [0u8, 1, 2, 3, 7] {
            for (w, h) in [(56u16, 28u16), (28, 56), (0, 0)] {
                let mut input = vec![sel, fmt];
                input.extend_from_slice(&w.to_le_bytes());
                input.extend_from_slice(&h.to_le_bytes());
                input.extend_from_slice(&img);
                checks::offload_answer(&input);
                input.truncate(input.len() - img.len() / 2);
                checks::offload_answer(&input);
            }
        }
    }
    checks::offload_answer(b"\x01\x00\x10\x00\x10\x00x-vlm-target-width: 28\nx-vlm-target-height: 56\nx-vlm-resize-filter: lanczos3\n");
    checks::offload_answer(
        b"\x01\x00\x10\x00\x10\x00x-vlm-target-width: 0\nx-vlm-target-height: 99999999999\n",
    );
    checks::offload_answer(b"\x01");
}
