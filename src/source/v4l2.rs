//! V4L2 cameras (`/dev/videoN`) through the pure-Rust `linuxvideo` crate:
//! format negotiation (MJPEG preferred, else YUYV), mmap streaming, YUYV and
//! MJPEG to RGB, and the device probe behind `edgeinfer devices`.
//! Builds without the `v4l2` feature, and 32-bit ARM builds, keep the
//! conversions and the listing but not capture.
#![cfg_attr(not(all(feature = "v4l2", target_pointer_width = "64")), allow(dead_code, unused_imports))]

mod convert;

pub use convert::{with_default_huffman_tables, yuyv_to_rgb_into};

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;
#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
use linuxvideo::format::{FrameIntervals, FrameSizes, PixFormat, PixelFormat as FourCc};
#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
use linuxvideo::stream::ReadStream;
#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
use linuxvideo::{BufType, CapabilityFlags, Device, Fract};
use serde::Serialize;

use super::config::{PixelFormat, SourceConfig};
use super::{FrameGate, SourceCtx, SourceEnd, SourceError};
use crate::message::{Frame, Input};

/// How long the capture loop waits for a frame before it looks for shutdown again.
const WAKE_MS: i32 = 100;
/// A camera that delivers nothing for this long (or 10 frame intervals, if longer) is reopened.
const STALL_MIN: Duration = Duration::from_secs(5);

#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
/// Runs the camera until it fails, disappears or the daemon stops.
pub fn run(cfg: &SourceConfig, ctx: &SourceCtx) -> Result<SourceEnd, SourceError> {
    let SourceConfig::V4l2 { device, width, height, fps, pixel_format, max_fps } = cfg else {
        return Err(SourceError("not a v4l2 source".into()));
    };
    let request = Request { width: *width, height: *height, fps: *fps, pixel_format: *pixel_format };
    let mut cam = Camera::open(Path::new(device), &request).map_err(SourceError)?;
    log::info!("pipeline `{}`: {}", ctx.pipeline, cam.describe(&request));
    let stall = cam.granted.fps.map_or(STALL_MIN, |f| STALL_MIN.max(Duration::from_secs_f64(10.0 / f.max(0.01))));
    let mut gate = FrameGate::new(*max_fps);
    let mut last_frame = Instant::now();
    loop {
        if ctx.stopped() {
            return Ok(SourceEnd::Stopped);
        }
        if !cam.wait_frame(WAKE_MS).map_err(|e| SourceError(read_error(&cam.path, &e)))? {
            if last_frame.elapsed() > stall {
                return Err(SourceError(format!(
                    "{}: no frame for {:.0} s (camera stalled); reopening it",
                    cam.path,
                    stall.as_secs_f64()
                )));
            }
            continue;
        }
        last_frame = Instant::now();
        // Asked before the buffer is converted, so frames over max_fps cost no decode.
        let admitted = gate.admit(Instant::now());
        match cam.dequeue(admitted).map_err(|e| SourceError(read_error(&cam.path, &e)))? {
            Captured::Frame(image, captured) => {
                if !ctx.push(Input::Frame(Frame { image, captured, origin: None })) {
                    return Ok(SourceEnd::Stopped);
                }
            }
            Captured::Skipped => {
                ctx.metrics.dropped_max_fps.fetch_add(1, Relaxed);
            }
            Captured::Bad(why) => ctx.bad_frame(&format!("{}: {why}", cam.path)),
        }
    }
}

/// What a source asks of the camera.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// Wanted width.
    pub width: u32,
    /// Wanted height.
    pub height: u32,
    /// Wanted frames per second (None: the driver's default).
    pub fps: Option<u32>,
    /// Wanted encoding (None: MJPEG if offered, else YUYV).
    pub pixel_format: Option<PixelFormat>,
}

/// What the driver granted, which may differ from what was asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Granted {
    /// Card name, e.g. `HD Pro Webcam C920`.
    pub card: String,
    /// Driver, e.g. `uvcvideo`.
    pub driver: String,
    /// The encoding frames arrive in.
    pub encoding: PixelFormat,
    /// Its FourCC, e.g. `MJPG`.
    pub fourcc: String,
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// Bytes per line of a YUYV frame.
    pub stride: usize,
    /// Frame rate set by the driver, when one was requested and granted.
    pub fps: Option<f64>,
}

#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
/// An open, streaming camera.
pub struct Camera {
    /// Device path, for messages.
    pub path: String,
    /// The negotiated format.
    pub granted: Granted,
    stream: ReadStream,
}

#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
/// One dequeued buffer's fate.
enum Captured {
    Frame(RgbImage, SystemTime),
    Skipped,
    Bad(String),
}

#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
impl Camera {
    /// Opens `path`, negotiates the format and frame interval and starts mmap streaming.
    /// Errors name the device and say what to do.
    pub fn open(path: &Path, request: &Request) -> Result<Camera, String> {
        // linuxvideo asserts on some driver answers; a panic there must not take the daemon down.
        catch_unwind(AssertUnwindSafe(|| Self::open_inner(path, request))).unwrap_or_else(|_| {
            Err(format!("{}: the driver answered something linuxvideo could not handle", path.display()))
        })
    }

    fn open_inner(path: &Path, request: &Request) -> Result<Camera, String> {
        let shown = path.display().to_string();
        let dev = Device::open(path).map_err(|e| open_error(path, &e))?;
        let caps = dev.capabilities().map_err(|e| format!("{shown}: cannot query capabilities: {e}"))?;
        let (card, driver) = (caps.card().to_string(), caps.driver().to_string());
        let avail = caps.device_capabilities();
        if !avail.contains(CapabilityFlags::VIDEO_CAPTURE) {
            let why = if avail.contains(CapabilityFlags::VIDEO_CAPTURE_MPLANE) {
                "is a multi-planar capture device, which edgeinfer does not support yet (use the `pipe` source)"
            } else {
                "is not a video capture device (a metadata, output or codec node)"
            };
            return Err(format!("{shown} ({card}) {why}; `edgeinfer devices` lists the cameras"));
        }
        let offered: Vec<FourCc> =
            dev.formats(BufType::VIDEO_CAPTURE).filter_map(Result::ok).map(|f| f.pixel_format()).collect();
        let wanted = choose_format(&offered, request.pixel_format).map_err(|why| format!("{shown}: {why}"))?;
        let capture = dev.video_capture(PixFormat::new(request.width, request.height, wanted)).map_err(|e| {
            format!("{shown}: cannot set {wanted} {}x{}: {}", request.width, request.height, explain(&e))
        })?;
        let got = capture.format();
        let encoding = encoding_of(got.pixel_format()).ok_or_else(|| {
            format!(
                "{shown}: the driver granted {} instead of {wanted}, which edgeinfer cannot decode",
                got.pixel_format()
            )
        })?;
        let (width, height) = (got.width(), got.height());
        let stride = match got.bytes_per_line() as usize {
            0 => width as usize * 2,
            n => n,
        };
        let fourcc = got.pixel_format().to_string();
        let fps = match request.fps {
            Some(f) => match capture.set_frame_interval(Fract::new(1, f)) {
                Ok(interval) if interval.numerator() > 0 => {
                    Some(interval.denominator() as f64 / interval.numerator() as f64)
                }
                Ok(_) => None,
                Err(e) => {
                    log::warn!("{shown}: cannot set {f} fps ({e}); using the driver's rate");
                    None
                }
            },
            None => None,
        };
        let stream = capture.into_stream().map_err(|e| format!("{shown}: cannot start streaming: {}", explain(&e)))?;
        Ok(Camera {
            path: shown,
            granted: Granted { card, driver, encoding, fourcc, width, height, stride, fps },
            stream,
        })
    }

    /// One line saying what was asked and what the driver granted.
    pub fn describe(&self, request: &Request) -> String {
        let g = &self.granted;
        let rate = g.fps.map_or("the driver's rate".to_string(), |f| format!("{f:.3} fps"));
        let mut line =
            format!("{} ({}, {}): {} {}x{} at {rate}", self.path, g.card, g.driver, g.fourcc, g.width, g.height);
        if (g.width, g.height) != (request.width, request.height) {
            line.push_str(&format!(" (asked for {}x{})", request.width, request.height));
        }
        if let (Some(asked), Some(got)) = (request.fps, g.fps) {
            if (got - asked as f64).abs() > 0.01 {
                line.push_str(&format!(" (asked for {asked} fps)"));
            }
        }
        line
    }

    /// Waits up to `timeout_ms` for a filled buffer. Errors and hang-ups count as
    /// ready, so the dequeue that follows reports them.
    fn wait_frame(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        Ok(n > 0)
    }

    /// Dequeues one buffer and converts it when `admitted`; the buffer goes back to the driver either way.
    fn dequeue(&mut self, admitted: bool) -> io::Result<Captured> {
        let g = &self.granted;
        self.stream.dequeue(|buf| {
            // linuxvideo does not expose the driver's buffer timestamp; the dequeue time is within a
            // frame interval of it.
            let captured = SystemTime::now();
            if !admitted {
                return Ok(Captured::Skipped);
            }
            if buf.is_error() {
                return Ok(Captured::Bad("the driver flagged the frame as corrupt".into()));
            }
            Ok(match decode(&buf, g) {
                Ok(image) => Captured::Frame(image, captured),
                Err(why) => Captured::Bad(why),
            })
        })
    }
}

fn decode(data: &[u8], g: &Granted) -> Result<RgbImage, String> {
    match g.encoding {
        PixelFormat::Mjpeg => mjpeg_to_rgb(data),
        PixelFormat::Yuyv => yuyv_to_rgb(data, g.width, g.height, g.stride),
    }
}

/// Decodes one MJPEG frame, supplying the standard Huffman tables when the camera left them out.
pub fn mjpeg_to_rgb(jpeg: &[u8]) -> Result<RgbImage, String> {
    if jpeg.is_empty() {
        return Err("empty MJPEG frame".into());
    }
    let fixed = with_default_huffman_tables(jpeg);
    crate::preprocess::decode_image(fixed.as_deref().unwrap_or(jpeg)).map_err(|e| format!("MJPEG frame: {e}"))
}

/// Converts a YUYV 4:2:2 frame (BT.601 limited range) into a new RGB image,
/// writing straight into the image's buffer. `stride` is bytes per source line.
pub fn yuyv_to_rgb(src: &[u8], width: u32, height: u32, stride: usize) -> Result<RgbImage, String> {
    let (w, h) = (width as usize, height as usize);
    if w > crate::preprocess::MAX_IMAGE_SIDE as usize || h > crate::preprocess::MAX_IMAGE_SIDE as usize {
        return Err(format!("YUYV frame {width}x{height} is larger than {0}x{0}", crate::preprocess::MAX_IMAGE_SIDE));
    }
    let mut rgb = vec![0u8; w * h * 3];
    yuyv_to_rgb_into(src, w, h, stride, &mut rgb)?;
    RgbImage::from_raw(width, height, rgb).ok_or_else(|| "RGB buffer size mismatch".into())
}

#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
fn encoding_of(f: FourCc) -> Option<PixelFormat> {
    match f {
        FourCc::MJPG | FourCc::JPEG => Some(PixelFormat::Mjpeg),
        FourCc::YUYV => Some(PixelFormat::Yuyv),
        _ => None,
    }
}

#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
/// Picks the FourCC to ask for: the configured encoding, else MJPEG (less USB
/// bandwidth, so full frame rates at 640x480 and up), else YUYV.
fn choose_format(offered: &[FourCc], configured: Option<PixelFormat>) -> Result<FourCc, String> {
    let has = |f: FourCc| offered.contains(&f);
    let list = || {
        if offered.is_empty() {
            "nothing".to_string()
        } else {
            offered.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", ")
        }
    };
    match configured {
        // A driver that lists nothing may still accept the format: let it decide.
        _ if offered.is_empty() => Ok(match configured {
            Some(PixelFormat::Yuyv) => FourCc::YUYV,
            _ => FourCc::MJPG,
        }),
        Some(PixelFormat::Mjpeg) if has(FourCc::MJPG) => Ok(FourCc::MJPG),
        Some(PixelFormat::Mjpeg) if has(FourCc::JPEG) => Ok(FourCc::JPEG),
        Some(PixelFormat::Mjpeg) => Err(format!("pixel_format = \"mjpeg\", but the camera offers {}", list())),
        Some(PixelFormat::Yuyv) if has(FourCc::YUYV) => Ok(FourCc::YUYV),
        Some(PixelFormat::Yuyv) => Err(format!("pixel_format = \"yuyv\", but the camera offers {}", list())),
        None if has(FourCc::MJPG) => Ok(FourCc::MJPG),
        None if has(FourCc::JPEG) => Ok(FourCc::JPEG),
        None if has(FourCc::YUYV) => Ok(FourCc::YUYV),
        None => Err(format!(
            "the camera offers neither MJPEG nor YUYV (it offers {}); the `pipe` source with ffmpeg can convert",
            list()
        )),
    }
}

/// Says why opening a device failed and what to do about it.
pub fn open_error(path: &Path, e: &io::Error) -> String {
    let p = path.display();
    match e.kind() {
        io::ErrorKind::NotFound => {
            format!("{p}: no such device (is the camera connected? `edgeinfer devices` lists the cameras)")
        }
        io::ErrorKind::PermissionDenied => {
            let group = file_group(path).unwrap_or_else(|| "video".into());
            format!(
                "{p}: permission denied (the device belongs to group `{group}`: \
                 sudo usermod -aG {group} $USER, then log in again)"
            )
        }
        _ => format!("{p}: cannot open: {}", explain(e)),
    }
}

/// Read and ioctl errors in words, with the ones that mean "unplugged" called so.
fn explain(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENODEV) => "the device is gone (unplugged?)".into(),
        Some(libc::EIO) => "I/O error (unplugged, or USB trouble)".into(),
        Some(libc::EBUSY) => "device busy (is another program using the camera?)".into(),
        Some(libc::ENOTTY) => "not a V4L2 device".into(),
        _ => e.to_string(),
    }
}

fn read_error(path: &str, e: &io::Error) -> String {
    format!("{path}: capture failed: {}", explain(e))
}

/// The name of the group owning `path`, from `/etc/group`.
pub fn file_group(path: &Path) -> Option<String> {
    let gid = std::fs::metadata(path).ok()?.gid();
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id = f.nth(1)?.parse::<u32>().ok()?;
        (id == gid).then(|| name.to_string())
    })
}

/// One V4L2 device node as `edgeinfer devices` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct VideoDevice {
    /// Device path.
    pub path: String,
    /// Card name.
    pub card: Option<String>,
    /// Driver name.
    pub driver: Option<String>,
    /// Where it is attached, e.g. `usb-0000:01:00.0-1.2`.
    pub bus: Option<String>,
    /// True for a node that captures video (a camera).
    pub capture: bool,
    /// Capture formats.
    pub formats: Vec<VideoFormat>,
    /// Why the node could not be opened or queried.
    pub error: Option<String>,
}

/// One capture format of a device.
#[derive(Debug, Clone, Serialize)]
pub struct VideoFormat {
    /// FourCC, e.g. `MJPG`.
    pub fourcc: String,
    /// The driver's description.
    pub description: String,
    /// True when the v4l2 source can decode it (MJPEG, YUYV).
    pub usable: bool,
    /// Discrete frame sizes.
    pub sizes: Vec<VideoSize>,
    /// A stepwise or continuous size range instead of discrete sizes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_range: Option<SizeRange>,
    /// Why the sizes could not be listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A frame size and its frame rates.
#[derive(Debug, Clone, Serialize)]
pub struct VideoSize {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Discrete frame rates, fastest first.
    pub fps: Vec<f64>,
    /// A continuous frame rate range `[min, max]` instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fps_range: Option<[f64; 2]>,
}

/// A range of frame sizes.
#[derive(Debug, Clone, Serialize)]
pub struct SizeRange {
    /// Smallest width.
    pub min_width: u32,
    /// Smallest height.
    pub min_height: u32,
    /// Largest width.
    pub max_width: u32,
    /// Largest height.
    pub max_height: u32,
    /// Width step (1 for continuous).
    pub step_width: u32,
    /// Height step (1 for continuous).
    pub step_height: u32,
}

/// The `/dev/video*` character devices under `dev_dir`, probed, in numeric order.
pub fn list_devices(dev_dir: &Path) -> Vec<VideoDevice> {
    let Ok(entries) = std::fs::read_dir(dev_dir) else { return Vec::new() };
    let mut nodes: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix("video")?.parse::<u32>().ok()?;
            e.file_type().ok()?.is_char_device().then(|| (n, e.path()))
        })
        .collect();
    nodes.sort();
    nodes.into_iter().map(|(_, p)| probe(&p)).collect()
}

/// Opens `path` read-only for queries and lists what it offers; never fails.
pub fn probe(path: &Path) -> VideoDevice {
    let blank = |error: String| VideoDevice {
        path: path.display().to_string(),
        card: None,
        driver: None,
        bus: None,
        capture: false,
        formats: Vec::new(),
        error: Some(error),
    };
    match catch_unwind(AssertUnwindSafe(|| probe_inner(path))) {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => blank(e),
        Err(_) => blank("the driver answered something linuxvideo could not handle".into()),
    }
}

/// linuxvideo 0.3 does not build for 32-bit ARM (its mmap offset assumes a 64-bit `off_t`).
#[cfg(not(all(feature = "v4l2", target_pointer_width = "64")))]
const NOT_ON_32_BIT: &str = "V4L2 capture is not built into 32-bit ARM binaries (linuxvideo 0.3 needs a 64-bit \
    off_t); use the `pipe` source: [\"ffmpeg\", \"-f\", \"v4l2\", \"-i\", \"/dev/video0\", \"-f\", \"mjpeg\", \"-\"]";

/// Why this binary cannot capture: built without the `v4l2` feature, or for a 32-bit target.
#[cfg(not(all(feature = "v4l2", target_pointer_width = "64")))]
fn no_capture() -> String {
    if cfg!(feature = "v4l2") {
        NOT_ON_32_BIT.into()
    } else {
        crate::features::not_built("v4l2", "V4L2 capture")
    }
}

#[cfg(not(all(feature = "v4l2", target_pointer_width = "64")))]
fn probe_inner(_path: &Path) -> Result<VideoDevice, String> {
    Err(no_capture())
}

/// Runs the camera until it fails, disappears or the daemon stops.
#[cfg(not(all(feature = "v4l2", target_pointer_width = "64")))]
pub fn run(_cfg: &SourceConfig, _ctx: &SourceCtx) -> Result<SourceEnd, SourceError> {
    Err(SourceError(no_capture()))
}

#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
fn probe_inner(path: &Path) -> Result<VideoDevice, String> {
    let dev = Device::open(path).map_err(|e| open_error(path, &e))?;
    let caps = dev.capabilities().map_err(|e| format!("cannot query capabilities: {}", explain(&e)))?;
    let capture = caps.device_capabilities().contains(CapabilityFlags::VIDEO_CAPTURE);
    let mut formats = Vec::new();
    if capture {
        for desc in dev.formats(BufType::VIDEO_CAPTURE) {
            let desc = desc.map_err(|e| format!("cannot list formats: {}", explain(&e)))?;
            formats.push(probe_format(&dev, desc.pixel_format(), desc.description()));
        }
    }
    Ok(VideoDevice {
        path: path.display().to_string(),
        card: Some(caps.card().to_string()),
        driver: Some(caps.driver().to_string()),
        bus: Some(caps.bus_info().to_string()),
        capture,
        formats,
        error: None,
    })
}

#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
fn probe_format(dev: &Device, fourcc: FourCc, description: &str) -> VideoFormat {
    let mut out = VideoFormat {
        fourcc: fourcc.to_string(),
        description: description.to_string(),
        usable: encoding_of(fourcc).is_some(),
        sizes: Vec::new(),
        size_range: None,
        error: None,
    };
    match dev.frame_sizes(fourcc) {
        Ok(FrameSizes::Discrete(sizes)) => {
            for s in sizes {
                let (fps, fps_range) = rates(dev.frame_intervals(fourcc, s.width(), s.height()).ok());
                out.sizes.push(VideoSize { width: s.width(), height: s.height(), fps, fps_range });
            }
        }
        Ok(FrameSizes::Stepwise(r) | FrameSizes::Continuous(r)) => {
            out.size_range = Some(SizeRange {
                min_width: r.min_width(),
                min_height: r.min_height(),
                max_width: r.max_width(),
                max_height: r.max_height(),
                step_width: r.step_width().max(1),
                step_height: r.step_height().max(1),
            });
        }
        Err(e) => out.error = Some(format!("cannot list frame sizes: {}", explain(&e))),
    }
    out
}

#[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
/// Frame rates from frame intervals: discrete rates fastest first, or a `[min, max]` range.
fn rates(intervals: Option<FrameIntervals>) -> (Vec<f64>, Option<[f64; 2]>) {
    let fps = |f: &Fract| {
        if f.numerator() == 0 {
            0.0
        } else {
            (f.denominator() as f64 / f.numerator() as f64 * 100.0).round() / 100.0
        }
    };
    match intervals {
        Some(FrameIntervals::Discrete(list)) => {
            let mut v: Vec<f64> = list.iter().map(|i| fps(i.fract())).collect();
            v.sort_by(|a, b| b.total_cmp(a));
            v.dedup();
            (v, None)
        }
        Some(FrameIntervals::Stepwise(r) | FrameIntervals::Continuous(r)) => {
            (Vec::new(), Some([fps(r.max()), fps(r.min())]))
        }
        None => (Vec::new(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(feature = "v4l2", target_pointer_width = "64"))]
    #[test]
    fn format_choice_prefers_mjpeg_and_honours_the_config() {
        let both = [FourCc::YUYV, FourCc::MJPG];
        assert_eq!(choose_format(&both, None).unwrap(), FourCc::MJPG);
        assert_eq!(choose_format(&both, Some(PixelFormat::Yuyv)).unwrap(), FourCc::YUYV);
        assert_eq!(choose_format(&[FourCc::YUYV], None).unwrap(), FourCc::YUYV);
        assert_eq!(choose_format(&[FourCc::JPEG], None).unwrap(), FourCc::JPEG);
        let e = choose_format(&[FourCc::YUYV], Some(PixelFormat::Mjpeg)).unwrap_err();
        assert!(e.contains("offers YUYV"), "{e}");
        let e = choose_format(&[FourCc::RGB3], None).unwrap_err();
        assert!(e.contains("neither MJPEG nor YUYV") && e.contains("RGB3"), "{e}");
    }

    #[test]
    fn open_errors_name_the_device_and_the_fix() {
        let p = Path::new("/dev/video77");
        let e = open_error(p, &io::Error::from(io::ErrorKind::NotFound));
        assert!(e.starts_with("/dev/video77: no such device"), "{e}");
        let e = open_error(p, &io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(e.contains("permission denied") && e.contains("usermod -aG video"), "{e}");
        let gone = read_error("/dev/video0", &io::Error::from_raw_os_error(libc::ENODEV));
        assert!(gone.contains("/dev/video0") && gone.contains("unplugged"), "{gone}");
    }

    #[test]
    fn a_regular_file_is_not_listed_and_a_non_v4l2_node_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("video0"), b"").unwrap();
        assert!(list_devices(dir.path()).is_empty());
        // /dev/null is a character device but no V4L2 node.
        let d = probe(Path::new("/dev/null"));
        assert!(!d.capture);
        let why = if cfg!(all(feature = "v4l2", target_pointer_width = "64")) {
            "not a V4L2 device"
        } else if cfg!(feature = "v4l2") {
            "32-bit ARM binaries"
        } else {
            "built with the `v4l2` feature"
        };
        assert!(d.error.as_deref().is_some_and(|e| e.contains(why)), "{d:?}");
    }
}
