//! Images (SPEC-tokenizer.md section 6): the size for the `[IMG]` token grid, read from the PNG or JPEG header
//! alone, and the pixels for the vision tower, decoded (the `image` crate, PNG and JPEG only), composited over
//! white, resized to the token grid and normalised as mistral-common's `ImageEncoder` does.

use std::path::Path;

use base64::Engine as _;
use tekken::image::{ImageConfig, ImageEncoder};

use crate::reference::vision::PixelImage;

use super::TokenizerError;

/// Width and height in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageSize {
    pub width: usize,
    pub height: usize,
}

impl ImageSize {
    /// Reads the size of the image an `image_url` names: a `data:image/...;base64,` URL or a file path
    /// (`file://` allowed). Other URLs cannot be fetched here.
    pub fn from_url(url: &str) -> Result<ImageSize, TokenizerError> {
        if let Some(rest) = url.strip_prefix("data:") {
            let (_, payload) = rest
                .split_once(";base64,")
                .ok_or_else(|| TokenizerError::Image("a data URL must be base64 (`data:image/png;base64,...`)".into()))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(payload.trim())
                .map_err(|e| TokenizerError::Image(format!("data URL is not base64: {e}")))?;
            return ImageSize::from_header(&bytes);
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Err(TokenizerError::Image(format!(
                "{url}: remote images are not fetched; pass a file path or a data URL"
            )));
        }
        ImageSize::from_file(url.strip_prefix("file://").unwrap_or(url))
    }

    /// Reads the size from the first bytes of an image file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ImageSize, TokenizerError> {
        use std::io::Read;
        let path = path.as_ref();
        let mut head = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(1 << 20).read_to_end(&mut head))
            .map_err(|e| TokenizerError::Image(format!("{}: {e}", path.display())))?;
        ImageSize::from_header(&head).map_err(|e| TokenizerError::Image(format!("{}: {e}", path.display())))
    }

    /// The size from a PNG (IHDR) or JPEG (first SOFn marker) header.
    pub fn from_header(bytes: &[u8]) -> Result<ImageSize, TokenizerError> {
        const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
        let be16 = |b: &[u8], at: usize| b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]) as usize);
        let be32 = |b: &[u8], at: usize| b.get(at..at + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize);
        let size = if bytes.starts_with(PNG) {
            // Signature, then the IHDR chunk: length, "IHDR", width, height.
            if bytes.get(12..16) != Some(b"IHDR") {
                return Err(TokenizerError::Image("PNG without IHDR".into()));
            }
            be32(bytes, 16).zip(be32(bytes, 20))
        } else if bytes.starts_with(&[0xff, 0xd8]) {
            let mut at = 2;
            let mut found = None;
            while let (Some(&0xff), Some(&marker)) = (bytes.get(at), bytes.get(at + 1)) {
                if marker == 0xff {
                    at += 1; // fill byte
                    continue;
                }
                let length = be16(bytes, at + 2);
                // SOF0..SOF15 carry the frame size, except DHT (c4), JPG (c8) and DAC (cc).
                if (0xc0..=0xcf).contains(&marker) && ![0xc4, 0xc8, 0xcc].contains(&marker) {
                    found = be16(bytes, at + 7).zip(be16(bytes, at + 5));
                    break;
                }
                match length {
                    Some(length) if length >= 2 => at += 2 + length,
                    _ => break,
                }
            }
            found
        } else {
            return Err(TokenizerError::Image("not a PNG or JPEG image".into()));
        };
        match size {
            Some((width, height)) if width > 0 && height > 0 => Ok(ImageSize { width, height }),
            Some((width, height)) => Err(TokenizerError::Image(format!("image of size {width}x{height}"))),
            None => Err(TokenizerError::Image("truncated image header".into())),
        }
    }
}

/// The `[IMG]`/`[IMG_BREAK]`/`[IMG_END]` ids of an image of this size.
///
/// The resize follows section 6: `W = max(round(W / r), 1)` (halves to even). The `tekken` crate rejects an image
/// whose short side rounds to 0 instead of clamping it to 1, so the resize is done here and the crate only lays out
/// the grid of the already-resized size (which it leaves alone, being within `max_image_size`).
pub fn image_token_ids(encoder: &ImageEncoder, size: ImageSize) -> Result<Vec<u32>, TokenizerError> {
    let fitted = fit_to_max(&encoder.config, size);
    encoder.encode_dimensions(fitted.width, fitted.height).map_err(|e| TokenizerError::Image(e.to_string()))
}

/// The size scaled down (aspect kept) so that neither side exceeds `max_image_size`; unchanged when it fits.
pub fn fit_to_max(config: &ImageConfig, size: ImageSize) -> ImageSize {
    let max = config.max_image_size as f64;
    let (w, h) = (size.width as f64, size.height as f64);
    let ratio = (w / max).max(h / max);
    if ratio > 1.0 {
        ImageSize { width: ((w / ratio).round_ties_even() as usize).max(1), height: ((h / ratio).round_ties_even() as usize).max(1) }
    } else {
        size
    }
}

/// The pixel size the tower sees: each side of the fitted size rounded up to whole `patch * merge` blocks, one
/// block per `[IMG]` token.
pub fn tower_input_size(config: &ImageConfig, size: ImageSize) -> ImageSize {
    let block = config.image_patch_size * config.spatial_merge_size.max(1);
    let fitted = fit_to_max(config, size);
    ImageSize { width: fitted.width.div_ceil(block) * block, height: fitted.height.div_ceil(block) * block }
}

/// Image files above this size are refused before they are read.
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;
/// Images with a side above this are refused before they are decoded.
pub const MAX_IMAGE_SIDE: usize = 16384;

/// The Pixtral normalisation (CLIP's mean and std), per RGB channel, with the spec's digits.
#[allow(clippy::excessive_precision)]
pub const PIXTRAL_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const PIXTRAL_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The tower's input of the image an `image_url` names (a file path, `file://` allowed, or a base64 data URL), as
/// [`ImageSize::from_url`] reads its size.
pub fn load_pixels_from_url(url: &str, config: &ImageConfig) -> crate::Result<PixelImage> {
    if let Some(rest) = url.strip_prefix("data:") {
        let unreadable = |reason: String| crate::Error::ImageUnreadable { path: "data URL".into(), reason };
        let (_, payload) = rest.split_once(";base64,").ok_or_else(|| unreadable("a data URL must be base64".into()))?;
        if payload.len() as u64 > MAX_IMAGE_FILE_BYTES / 3 * 4 + 4 {
            return Err(crate::Error::ImageTooLarge { path: "data URL".into(), what: format!("more than {MAX_IMAGE_FILE_BYTES} bytes") });
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(payload.trim()).map_err(|e| unreadable(format!("not base64: {e}")))?;
        return decode_pixels(&bytes, "data URL", config);
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(crate::Error::ImageUnreadable { path: url.into(), reason: "remote images are not fetched; pass a file path or a data URL".into() });
    }
    load_pixels(url.strip_prefix("file://").unwrap_or(url), config)
}

/// Reads and preprocesses an image file for the tower (see [`decode_pixels`]). Files above
/// [`MAX_IMAGE_FILE_BYTES`] are refused unread.
pub fn load_pixels(path: impl AsRef<Path>, config: &ImageConfig) -> crate::Result<PixelImage> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let unreadable = |reason: String| crate::Error::ImageUnreadable { path: shown.clone(), reason };
    let bytes = std::fs::metadata(path).map_err(|e| unreadable(e.to_string()))?.len();
    if bytes > MAX_IMAGE_FILE_BYTES {
        return Err(crate::Error::ImageTooLarge { path: shown, what: format!("{bytes} bytes, the limit is {MAX_IMAGE_FILE_BYTES}") });
    }
    let data = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
    decode_pixels(&data, &shown, config)
}

/// Decodes a PNG or JPEG and makes the tower's input of it: RGB with any alpha composited over white, resized
/// (bicubic, Catmull-Rom, as PIL's BICUBIC) to [`tower_input_size`], scaled to [0, 1] and normalised with
/// [`PIXTRAL_MEAN`] / [`PIXTRAL_STD`], channel-major. `name` names the image in errors. Images with a side above
/// [`MAX_IMAGE_SIDE`] are refused before decoding.
pub fn decode_pixels(bytes: &[u8], name: &str, config: &ImageConfig) -> crate::Result<PixelImage> {
    let unreadable = |reason: String| crate::Error::ImageUnreadable { path: name.to_string(), reason };
    let size = ImageSize::from_header(bytes).map_err(|e| unreadable(e.to_string()))?;
    if size.width.max(size.height) > MAX_IMAGE_SIDE {
        return Err(crate::Error::ImageTooLarge {
            path: name.to_string(),
            what: format!("{}x{} pixels, the limit is {MAX_IMAGE_SIDE} per side", size.width, size.height),
        });
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| unreadable(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE as u32);
    limits.max_image_height = Some(MAX_IMAGE_SIDE as u32);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(limit) => crate::Error::ImageTooLarge { path: name.to_string(), what: limit.to_string() },
        other => unreadable(other.to_string()),
    })?;
    let rgb = if decoded.color().has_alpha() {
        let rgba = decoded.to_rgba8();
        let over_white = |c: u8, a: u8| ((c as u32 * a as u32 + 255 * (255 - a as u32) + 127) / 255) as u8;
        image::RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0;
            image::Rgb([over_white(r, a), over_white(g, a), over_white(b, a)])
        })
    } else {
        decoded.to_rgb8()
    };
    let target = tower_input_size(config, ImageSize { width: rgb.width() as usize, height: rgb.height() as usize });
    let resized = if (target.width, target.height) == (rgb.width() as usize, rgb.height() as usize) {
        rgb
    } else {
        image::imageops::resize(&rgb, target.width as u32, target.height as u32, image::imageops::FilterType::CatmullRom)
    };
    let plane = target.width * target.height;
    let mut data = vec![0.0f32; 3 * plane];
    for (i, pixel) in resized.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (pixel.0[c] as f32 / 255.0 - PIXTRAL_MEAN[c]) / PIXTRAL_STD[c];
        }
    }
    Ok(PixelImage { width: target.width, height: target.height, channels: 3, data })
}
