//! Image input for the vision tower: PNG and JPEG decoding, alpha over white, the resize to whole 28-pixel blocks
//! within 1540, the Pixtral normalisation, agreement with the `[IMG]` token grid, and typed errors for unreadable
//! and oversized images.

use base64::Engine as _;
use small4::tokenizer::image::{
    decode_pixels, image_token_ids, load_pixels, load_pixels_from_url, tower_input_size, MAX_IMAGE_FILE_BYTES, MAX_IMAGE_SIDE, PIXTRAL_MEAN, PIXTRAL_STD,
};
use small4::tokenizer::{ImageSize, Tokenizer};
use small4::Error;
use tekken::image::ImageConfig;

fn tokenizer() -> Tokenizer {
    Tokenizer::stand_in().unwrap()
}

fn config() -> ImageConfig {
    tokenizer().image_encoder().unwrap().config.clone()
}

fn png(image: &image::DynamicImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

fn jpeg(image: &image::RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(image.clone()).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg).unwrap();
    bytes
}

fn normalised(value: u8, channel: usize) -> f32 {
    (value as f32 / 255.0 - PIXTRAL_MEAN[channel]) / PIXTRAL_STD[channel]
}

#[test]
fn a_block_sized_png_keeps_its_pixels_normalised_channel_major() {
    let (w, h) = (56u32, 28u32);
    let rgb = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 4) as u8, (y * 9) as u8, ((x + y) % 256) as u8]));
    let pixels = decode_pixels(&png(&image::DynamicImage::ImageRgb8(rgb.clone())), "gradient", &config()).unwrap();
    assert_eq!((pixels.width, pixels.height, pixels.channels), (56, 28, 3));
    let plane = 56 * 28;
    for (x, y, p) in rgb.enumerate_pixels() {
        for c in 0..3 {
            let got = pixels.data[c * plane + (y * w + x) as usize];
            assert_eq!(got, normalised(p.0[c], c), "pixel ({x}, {y}) channel {c}");
        }
    }
}

#[test]
fn transparency_is_composited_over_white() {
    let rgba = image::RgbaImage::from_fn(28, 28, |x, _| if x < 14 { image::Rgba([0, 0, 0, 0]) } else { image::Rgba([200, 100, 50, 255]) });
    let pixels = decode_pixels(&png(&image::DynamicImage::ImageRgba8(rgba)), "half transparent", &config()).unwrap();
    let plane = 28 * 28;
    for c in 0..3 {
        assert_eq!(pixels.data[c * plane], normalised(255, c), "transparent black is white");
        assert_eq!(pixels.data[c * plane + 20], normalised([200, 100, 50][c], c), "opaque stays");
    }
}

#[test]
fn sizes_are_rounded_up_to_whole_blocks_within_the_maximum_and_match_the_token_grid() {
    let tokenizer = tokenizer();
    let encoder = tokenizer.image_encoder().unwrap();
    let img = |id: u32| encoder.special_ids.img == id;
    for (w, h, want) in [(56, 28, (56, 28)), (100, 30, (112, 56)), (1, 1, (28, 28)), (2000, 1000, (1540, 784)), (3080, 1000, (1540, 504))] {
        let size = ImageSize { width: w, height: h };
        let tower = tower_input_size(&encoder.config, size);
        assert_eq!((tower.width, tower.height), want, "{w}x{h}");
        let tokens = image_token_ids(encoder, size).unwrap();
        assert_eq!(tokens.iter().filter(|&&t| img(t)).count(), (tower.width / 28) * (tower.height / 28), "{w}x{h}: one [IMG] per 28x28 block");
    }
    // Decoded images that need a resize, up to whole blocks and down to the maximum: a constant colour stays that
    // colour (the filter's weights sum to one). 1600x40 fits to 1540x38 (38.5 rounds to even), then 55x2 blocks.
    for ((w, h), want) in [((100, 30), (112, 56)), ((1600, 40), (1540, 56))] {
        let flat = image::RgbImage::from_pixel(w, h, image::Rgb([30, 60, 90]));
        let pixels = decode_pixels(&png(&image::DynamicImage::ImageRgb8(flat)), "flat", &config()).unwrap();
        assert_eq!((pixels.width, pixels.height), want);
        let plane = want.0 * want.1;
        for c in 0..3 {
            assert!(pixels.data[c * plane..][..plane].iter().all(|&v| v == normalised([30, 60, 90][c], c)), "{w}x{h} channel {c}");
        }
    }
}

#[test]
fn jpeg_decodes_to_the_same_grid_with_lossy_values() {
    let rgb = image::RgbImage::from_fn(84, 56, |x, y| image::Rgb([(x * 3) as u8, (y * 4) as u8, 128]));
    let pixels = decode_pixels(&jpeg(&rgb), "gradient.jpg", &config()).unwrap();
    assert_eq!((pixels.width, pixels.height), (84, 56));
    let plane = 84 * 56;
    // JPEG is lossy: within a few levels of 255 on a smooth gradient.
    let worst = rgb
        .enumerate_pixels()
        .flat_map(|(x, y, p)| (0..3).map(move |c| (c, (y * 84 + x) as usize, p.0[c])))
        .map(|(c, i, v)| (pixels.data[c * plane + i] - normalised(v, c)).abs() * PIXTRAL_STD[c] * 255.0)
        .fold(0.0, f32::max);
    assert!(worst < 8.0, "JPEG error of {worst} levels");
}

#[test]
fn files_and_data_urls_give_the_same_pixels() {
    let rgb = image::RgbImage::from_fn(30, 40, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 77]));
    let bytes = png(&image::DynamicImage::ImageRgb8(rgb));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.png");
    std::fs::write(&path, &bytes).unwrap();
    let from_file = load_pixels(&path, &config()).unwrap();
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&bytes));
    assert_eq!(load_pixels_from_url(&url, &config()).unwrap(), from_file);
    assert_eq!(load_pixels_from_url(&format!("file://{}", path.display()), &config()).unwrap(), from_file);
    assert_eq!((from_file.width, from_file.height), (56, 56));
}

#[test]
fn unreadable_images_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let unreadable = |r: small4::Result<_>, what: &str| match r {
        Err(Error::ImageUnreadable { reason, .. }) => assert!(!reason.is_empty(), "{what}"),
        other => panic!("{what}: expected ImageUnreadable, got {other:?}"),
    };
    unreadable(load_pixels(dir.path().join("missing.png"), &config()), "missing file");
    unreadable(decode_pixels(b"GIF89a not supported", "gif", &config()), "not PNG or JPEG");
    let good = png(&image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(28, 28, image::Rgb([1, 2, 3]))));
    unreadable(decode_pixels(&good[..good.len() / 2], "truncated", &config()), "truncated PNG");
    unreadable(load_pixels_from_url("https://example.com/cat.png", &config()), "remote URL");
    unreadable(load_pixels_from_url("data:image/png;base64,@@@", &config()), "bad base64");
}

#[test]
fn oversized_images_are_refused_before_decoding() {
    // A PNG header claiming a side above the limit: refused from the header, nothing is decoded.
    let mut header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    header.extend_from_slice(&(MAX_IMAGE_SIDE as u32 + 1).to_be_bytes());
    header.extend_from_slice(&10u32.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    match decode_pixels(&header, "wide.png", &config()) {
        Err(Error::ImageTooLarge { what, .. }) => assert!(what.contains(&MAX_IMAGE_SIDE.to_string()), "{what}"),
        other => panic!("expected ImageTooLarge, got {other:?}"),
    }
    // A file above the byte limit (sparse: no disk used) is refused unread.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.png");
    std::fs::File::create(&path).unwrap().set_len(MAX_IMAGE_FILE_BYTES + 1).unwrap();
    match load_pixels(&path, &config()) {
        Err(Error::ImageTooLarge { path: p, what }) => assert!(p.ends_with("huge.png") && what.contains("bytes"), "{p}: {what}"),
        other => panic!("expected ImageTooLarge, got {other:?}"),
    }
}
