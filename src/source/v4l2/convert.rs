//! Pixel work for V4L2 frames that needs nothing but `std`: YUYV (BT.601,
//! limited range) to packed RGB, and the standard Huffman tables that many
//! webcams leave out of their MJPEG frames.

/// Converts packed YUYV 4:2:2 (`Y0 U Y1 V` per pixel pair) to packed RGB24 in `dst`.
///
/// `stride` is the source's bytes per line (drivers may pad rows). BT.601
/// limited range (Y 16..235, Cb/Cr 16..240) in 8.8 fixed point, the range
/// UVC webcams send.
pub fn yuyv_to_rgb_into(src: &[u8], width: usize, height: usize, stride: usize, dst: &mut [u8]) -> Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("empty YUYV frame ({width}x{height})"));
    }
    if !width.is_multiple_of(2) {
        return Err(format!("YUYV frames need an even width (got {width}): pixels come in pairs"));
    }
    let row_bytes = width * 2;
    if stride < row_bytes {
        return Err(format!("YUYV stride {stride} is shorter than a {width}-pixel row ({row_bytes} bytes)"));
    }
    let needed = stride * (height - 1) + row_bytes;
    if src.len() < needed {
        return Err(format!("YUYV frame truncated: {} bytes, {width}x{height} needs {needed}", src.len()));
    }
    if dst.len() != width * height * 3 {
        return Err(format!("RGB buffer is {} bytes, {width}x{height} needs {}", dst.len(), width * height * 3));
    }
    for (row, out) in src.chunks(stride).zip(dst.chunks_exact_mut(width * 3)) {
        for (yuyv, rgb) in row[..row_bytes].chunks_exact(4).zip(out.chunks_exact_mut(6)) {
            let d = yuyv[1] as i32 - 128;
            let e = yuyv[3] as i32 - 128;
            // The chroma terms are shared by both pixels of the pair; +128 rounds the >> 8.
            let r = 409 * e + 128;
            let g = -100 * d - 208 * e + 128;
            let b = 516 * d + 128;
            let y0 = 298 * (yuyv[0] as i32 - 16);
            let y1 = 298 * (yuyv[2] as i32 - 16);
            rgb[0] = clamp8((y0 + r) >> 8);
            rgb[1] = clamp8((y0 + g) >> 8);
            rgb[2] = clamp8((y0 + b) >> 8);
            rgb[3] = clamp8((y1 + r) >> 8);
            rgb[4] = clamp8((y1 + g) >> 8);
            rgb[5] = clamp8((y1 + b) >> 8);
        }
    }
    Ok(())
}

#[inline(always)]
fn clamp8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// If `jpeg` has no Huffman table (DHT) before its scan, as UVC MJPEG frames
/// often do (they rely on the tables of JPEG Annex K.3), returns a copy with
/// those tables inserted before the scan. `None` when nothing is missing or
/// the markers cannot be walked (the decoder then reports the problem).
pub fn with_default_huffman_tables(jpeg: &[u8]) -> Option<Vec<u8>> {
    if jpeg.len() < 4 || jpeg[0] != 0xFF || jpeg[1] != 0xD8 {
        return None;
    }
    let mut pos = 2;
    loop {
        if pos + 1 >= jpeg.len() || jpeg[pos] != 0xFF {
            return None;
        }
        let marker = jpeg[pos + 1];
        match marker {
            // Fill bytes before a marker.
            0xFF => pos += 1,
            0xC4 => return None,
            0xDA => {
                let mut out = Vec::with_capacity(jpeg.len() + DEFAULT_DHT_LEN);
                out.extend_from_slice(&jpeg[..pos]);
                push_default_dht(&mut out);
                out.extend_from_slice(&jpeg[pos..]);
                return Some(out);
            }
            0x01 | 0xD0..=0xD7 => pos += 2,
            _ => {
                let len = *jpeg.get(pos + 2)? as usize * 256 + *jpeg.get(pos + 3)? as usize;
                if len < 2 {
                    return None;
                }
                pos += 2 + len;
            }
        }
    }
}

/// JPEG Annex K.3 tables: (class << 4 | id, code counts per length 1..=16, symbols).
const DEFAULT_TABLES: [(u8, [u8; 16], &[u8]); 4] = [
    (0x00, [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
    (0x01, [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
    (0x10, [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D], &LUMA_AC),
    (0x11, [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77], &CHROMA_AC),
];

/// Bytes of the DHT segment holding [`DEFAULT_TABLES`], marker included.
const DEFAULT_DHT_LEN: usize = 2 + 2 + 4 * 17 + 12 + 12 + 162 + 162;

fn push_default_dht(out: &mut Vec<u8>) {
    let len = (DEFAULT_DHT_LEN - 2) as u16;
    out.extend_from_slice(&[0xFF, 0xC4]);
    out.extend_from_slice(&len.to_be_bytes());
    for (class_id, counts, symbols) in DEFAULT_TABLES {
        out.push(class_id);
        out.extend_from_slice(&counts);
        out.extend_from_slice(symbols);
    }
}

#[rustfmt::skip]
const LUMA_AC: [u8; 162] = [
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
    0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0,
    0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25, 0x26, 0x27, 0x28,
    0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
    0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
    0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
    0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5,
    0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2,
    0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
    0xf9, 0xfa,
];

#[rustfmt::skip]
const CHROMA_AC: [u8; 162] = [
    0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71,
    0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33, 0x52, 0xf0,
    0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18, 0x19, 0x1a, 0x26,
    0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48,
    0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87,
    0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5,
    0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3,
    0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda,
    0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
    0xf9, 0xfa,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tables_are_complete_and_consistent() {
        for (_, counts, symbols) in DEFAULT_TABLES {
            assert_eq!(counts.iter().map(|&c| c as usize).sum::<usize>(), symbols.len());
        }
        let mut seg = Vec::new();
        push_default_dht(&mut seg);
        assert_eq!(seg.len(), DEFAULT_DHT_LEN);
        assert_eq!(u16::from_be_bytes([seg[2], seg[3]]) as usize, seg.len() - 2);
    }

    #[test]
    fn tables_are_left_alone_when_present_and_walks_stop_on_garbage() {
        let has_dht = [0xFF, 0xD8, 0xFF, 0xC4, 0x00, 0x02, 0xFF, 0xDA, 0x00, 0x02];
        assert!(with_default_huffman_tables(&has_dht).is_none());
        assert!(with_default_huffman_tables(b"not a jpeg").is_none());
        // A segment length running past the end.
        assert!(with_default_huffman_tables(&[0xFF, 0xD8, 0xFF, 0xE0, 0x7F]).is_none());
        let bare = [0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x02, 0xFF, 0xDA, 0x00, 0x02, 0xFF, 0xD9];
        let fixed = with_default_huffman_tables(&bare).unwrap();
        assert_eq!(fixed.len(), bare.len() + DEFAULT_DHT_LEN);
        assert_eq!(&fixed[6..8], &[0xFF, 0xC4]);
        assert_eq!(&fixed[6 + DEFAULT_DHT_LEN..], &bare[6..]);
    }
}
