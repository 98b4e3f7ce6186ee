//! Image sizes for the `[IMG]` token grid (SPEC-tokenizer.md section 6). Only the size is needed here: it is read
//! from the PNG or JPEG header, so no image decoder is linked (decoding pixels belongs to the vision tower).

use std::path::Path;

use base64::Engine as _;
use tekken::image::ImageEncoder;

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
    let max = encoder.config.max_image_size as f64;
    let (w, h) = (size.width as f64, size.height as f64);
    let ratio = (w / max).max(h / max);
    let (width, height) = if ratio > 1.0 {
        (((w / ratio).round_ties_even() as usize).max(1), ((h / ratio).round_ties_even() as usize).max(1))
    } else {
        (size.width, size.height)
    };
    encoder.encode_dimensions(width, height).map_err(|e| TokenizerError::Image(e.to_string()))
}
