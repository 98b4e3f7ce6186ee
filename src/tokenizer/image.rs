//! Images (SPEC-tokenizer.md section 6): the size for the `[IMG]` token grid, read from the PNG or JPEG header
//! alone, and the pixels for the vision tower, decoded (the `image` crate, PNG and JPEG only), composited over
//! white, resized to the token grid and normalised as mistral-common's `ImageEncoder` does.
//!
//! # Example
//!
//! One image through both paths: its size gives the `[IMG]` grid of the prompt, its pixels the tower's input of
//! the same grid (one 28 x 28 block per token with Small 4's 14-pixel patches merged 2 x 2).
//!
//! ```
//! use small4::tokenizer::image::{decode_pixels, image_token_ids, tower_input_size};
//! use small4::tokenizer::{ImageSize, Tokenizer};
//!
//! // A 60 x 30 PNG, made with the `image` crate.
//! let mut png = Vec::new();
//! image::RgbImage::from_pixel(60, 30, image::Rgb([200, 100, 50]))
//!     .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
//!
//! let t = Tokenizer::stand_in()?;
//! let encoder = t.image_encoder().expect("the stand-in has an image config");
//! let size = ImageSize::from_header(&png)?;
//! assert_eq!(size, ImageSize { width: 60, height: 30 });
//!
//! // 60 x 30 pixels round up to 3 x 2 tokens: two rows of three [IMG], [IMG_BREAK] between rows, [IMG_END] last.
//! let [img, brk, end] = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"].map(|s| t.special_id(s).unwrap());
//! assert_eq!(image_token_ids(encoder, size)?, [img, img, img, brk, img, img, img, end]);
//!
//! // The tower sees the image resized to that grid: 84 x 56 pixels, 3 channels, channel-major.
//! assert_eq!(tower_input_size(&encoder.config, size), ImageSize { width: 84, height: 56 });
//! let pixels = decode_pixels(&png, "example.png", &encoder.config)?;
//! assert_eq!((pixels.width, pixels.height, pixels.channels), (84, 56, 3));
//! assert_eq!(pixels.data.len(), 3 * 84 * 56);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;

use base64::Engine as _;
use tekken::image::{ImageConfig, ImageEncoder};

use crate::reference::vision::PixelImage;

use super::TokenizerError;

/// Width and height in pixels (see the module example).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageSize {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
}

impl ImageSize {
    /// Reads the size of the image an `image_url` names: a `data:image/...;base64,` URL or a file path
    /// (`file://` allowed). Other URLs cannot be fetched here.
    ///
    /// ```
    /// use base64::Engine as _;
    /// use small4::tokenizer::ImageSize;
    ///
    /// // The PNG signature and IHDR chunk are all it reads: width 640, height 480.
    /// let mut header = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    /// header.extend(640u32.to_be_bytes());
    /// header.extend(480u32.to_be_bytes());
    /// let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&header));
    /// assert_eq!(ImageSize::from_url(&url)?, ImageSize { width: 640, height: 480 });
    ///
    /// // A path, with or without file://.
    /// let path = std::env::temp_dir().join(format!("small4-doc-from-url-{}.png", std::process::id()));
    /// std::fs::write(&path, &header)?;
    /// assert_eq!(ImageSize::from_url(&format!("file://{}", path.display()))?, ImageSize { width: 640, height: 480 });
    /// assert_eq!(ImageSize::from_file(&path)?, ImageSize { width: 640, height: 480 });
    /// std::fs::remove_file(&path)?;
    ///
    /// // Nothing is downloaded.
    /// assert!(ImageSize::from_url("https://example.com/cat.png").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_url(url: &str) -> Result<ImageSize, TokenizerError> {
        if let Some(rest) = url.strip_prefix("data:") {
            let (_, payload) =
                rest.split_once(";base64,").ok_or_else(|| TokenizerError::Image("a data URL must be base64 (`data:image/png;base64,...`)".into()))?;
            let bytes =
                base64::engine::general_purpose::STANDARD.decode(payload.trim()).map_err(|e| TokenizerError::Image(format!("data URL is not base64: {e}")))?;
            return ImageSize::from_header(&bytes);
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Err(TokenizerError::Image(format!("{url}: remote images are not fetched; pass a file path or a data URL")));
        }
        ImageSize::from_file(url.strip_prefix("file://").unwrap_or(url))
    }

    /// Reads the size from the first bytes of an image file (see [`ImageSize::from_url`] for an example).
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
    ///
    /// ```
    /// use small4::tokenizer::ImageSize;
    ///
    /// // A baseline JPEG: SOI, then the SOF0 segment (length 17, precision 8, height 480, width 640, ...).
    /// let jpeg = [0xff, 0xd8, 0xff, 0xc0, 0x00, 0x11, 0x08, 0x01, 0xe0, 0x02, 0x80, 0x03];
    /// assert_eq!(ImageSize::from_header(&jpeg)?, ImageSize { width: 640, height: 480 });
    /// assert!(ImageSize::from_header(b"GIF89a").is_err()); // PNG and JPEG only
    /// assert!(ImageSize::from_header(&jpeg[..8]).is_err()); // truncated
    /// # Ok::<(), small4::tokenizer::TokenizerError>(())
    /// ```
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
///
/// ```
/// use small4::tokenizer::image::image_token_ids;
/// use small4::tokenizer::{ImageSize, Tokenizer};
///
/// let t = Tokenizer::stand_in()?;
/// let encoder = t.image_encoder().unwrap();
/// let (img, end) = (t.special_id("[IMG]")?, t.special_id("[IMG_END]")?);
/// // A 3000 x 10 strip is fitted into 1540 pixels (1540 x 5), which is 55 x 1 tokens.
/// let ids = image_token_ids(encoder, ImageSize { width: 3000, height: 10 })?;
/// assert_eq!(ids.len(), 56);
/// assert!(ids[..55].iter().all(|&id| id == img) && ids[55] == end);
/// # Ok::<(), small4::Error>(())
/// ```
pub fn image_token_ids(encoder: &ImageEncoder, size: ImageSize) -> Result<Vec<u32>, TokenizerError> {
    let fitted = fit_to_max(&encoder.config, size);
    encoder.encode_dimensions(fitted.width, fitted.height).map_err(|e| TokenizerError::Image(e.to_string()))
}

/// The size scaled down (aspect kept) so that neither side exceeds `max_image_size`; unchanged when it fits.
///
/// ```
/// use small4::tokenizer::image::fit_to_max;
/// use small4::tokenizer::ImageSize;
/// use tekken::image::ImageConfig;
///
/// let config = ImageConfig { image_patch_size: 14, max_image_size: 1540, spatial_merge_size: 2 };
/// let size = |width, height| ImageSize { width, height };
/// assert_eq!(fit_to_max(&config, size(3080, 1000)), size(1540, 500));
/// assert_eq!(fit_to_max(&config, size(640, 480)), size(640, 480));
/// // A side never shrinks to nothing.
/// assert_eq!(fit_to_max(&config, size(100_000, 10)), size(1540, 1));
/// ```
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
///
/// ```
/// use small4::tokenizer::image::tower_input_size;
/// use small4::tokenizer::ImageSize;
/// use tekken::image::ImageConfig;
///
/// let config = ImageConfig { image_patch_size: 14, max_image_size: 1540, spatial_merge_size: 2 };
/// let size = |width, height| ImageSize { width, height };
/// // Fitted to 1540 x 500, then rounded up to 28-pixel blocks: 55 x 18 tokens.
/// assert_eq!(tower_input_size(&config, size(3080, 1000)), size(1540, 504));
/// assert_eq!(tower_input_size(&config, size(1, 1)), size(28, 28));
/// ```
pub fn tower_input_size(config: &ImageConfig, size: ImageSize) -> ImageSize {
    let block = config.image_patch_size * config.spatial_merge_size.max(1);
    let fitted = fit_to_max(config, size);
    ImageSize { width: fitted.width.div_ceil(block) * block, height: fitted.height.div_ceil(block) * block }
}

/// Image files above this size are refused before they are read.
///
/// ```
/// use small4::tokenizer::image::{load_pixels, MAX_IMAGE_FILE_BYTES};
/// use tekken::image::ImageConfig;
///
/// let config = ImageConfig { image_patch_size: 14, max_image_size: 1540, spatial_merge_size: 2 };
/// // A sparse file one byte over the limit: refused from its length alone, nothing is read.
/// let path = std::env::temp_dir().join(format!("small4-doc-huge-{}.png", std::process::id()));
/// std::fs::File::create(&path)?.set_len(MAX_IMAGE_FILE_BYTES + 1)?;
/// let result = load_pixels(&path, &config);
/// std::fs::remove_file(&path)?;
/// assert!(matches!(result, Err(small4::Error::ImageTooLarge { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;
/// Images with a side above this are refused before they are decoded.
///
/// ```
/// use small4::tokenizer::image::{decode_pixels, MAX_IMAGE_SIDE};
/// use tekken::image::ImageConfig;
///
/// let config = ImageConfig { image_patch_size: 14, max_image_size: 1540, spatial_merge_size: 2 };
/// // A PNG header claiming a side past the limit is refused without decoding anything.
/// let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
/// png.extend((MAX_IMAGE_SIDE as u32 + 1).to_be_bytes());
/// png.extend(1u32.to_be_bytes());
/// assert!(matches!(decode_pixels(&png, "huge.png", &config), Err(small4::Error::ImageTooLarge { .. })));
/// ```
pub const MAX_IMAGE_SIDE: usize = 16384;

/// The Pixtral normalisation (CLIP's mean and std), per RGB channel, with the spec's digits.
///
/// ```
/// use small4::tokenizer::image::{decode_pixels, PIXTRAL_MEAN, PIXTRAL_STD};
/// use tekken::image::ImageConfig;
///
/// let config = ImageConfig { image_patch_size: 14, max_image_size: 1540, spatial_merge_size: 2 };
/// // A white 28 x 28 image (already the tower's size, so not resized): every value is (1 - mean) / std.
/// let mut png = Vec::new();
/// image::RgbImage::from_pixel(28, 28, image::Rgb([255, 255, 255]))
///     .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
/// let pixels = decode_pixels(&png, "white.png", &config)?;
/// for c in 0..3 {
///     let plane = &pixels.data[c * 28 * 28..(c + 1) * 28 * 28];
///     assert!(plane.iter().all(|&v| v == (1.0 - PIXTRAL_MEAN[c]) / PIXTRAL_STD[c]));
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[allow(clippy::excessive_precision)]
pub const PIXTRAL_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// The standard deviations that go with [`PIXTRAL_MEAN`].
#[allow(clippy::excessive_precision)]
pub const PIXTRAL_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The tower's input of the image an `image_url` names (a file path, `file://` allowed, or a base64 data URL), as
/// [`ImageSize::from_url`] reads its size.
///
/// ```
/// use small4::tokenizer::image::{load_pixels, load_pixels_from_url};
/// use tekken::image::ImageConfig;
///
/// let config = ImageConfig { image_patch_size: 14, max_image_size: 1540, spatial_merge_size: 2 };
/// let path = std::env::temp_dir().join(format!("small4-doc-load-pixels-{}.png", std::process::id()));
/// image::RgbImage::from_pixel(30, 20, image::Rgb([0, 0, 0])).save(&path)?;
///
/// let from_path = load_pixels(&path, &config)?;
/// let from_url = load_pixels_from_url(&format!("file://{}", path.display()), &config)?;
/// std::fs::remove_file(&path)?;
/// assert_eq!(from_path, from_url);
/// assert_eq!((from_path.width, from_path.height), (56, 28)); // one 2 x 1 token grid
///
/// // Remote images are not fetched, and an unreadable file is a typed error.
/// assert!(matches!(
///     load_pixels_from_url("https://example.com/cat.png", &config),
///     Err(small4::Error::ImageUnreadable { .. })
/// ));
/// assert!(matches!(load_pixels("/nonexistent.png", &config), Err(small4::Error::ImageUnreadable { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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
/// [`MAX_IMAGE_FILE_BYTES`] are refused unread. See [`load_pixels_from_url`] for an example.
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
/// [`MAX_IMAGE_SIDE`] are refused before decoding. See the module example and [`PIXTRAL_MEAN`].
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
