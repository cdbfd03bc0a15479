//! `edgeinfer devices`: what a config could name on this machine: V4L2
//! cameras with their formats, sizes and frame rates, serial ports and IIO
//! sensors, as text or JSON.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::source::v4l2::{self, VideoDevice};

/// Printed when no node under /dev captures video.
pub const NO_CAMERAS: &str =
    "no V4L2 capture devices found under /dev (is the camera connected? is the user in the `video` group?)";

/// Everything found.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// `/dev/video*` nodes, cameras or not.
    pub video: Vec<VideoDevice>,
    /// Serial ports.
    pub serial: Vec<SerialPort>,
    /// IIO devices.
    pub iio: Vec<IioDevice>,
}

/// A serial port.
#[derive(Debug, Clone, Serialize)]
pub struct SerialPort {
    /// Device path, e.g. `/dev/ttyUSB0`.
    pub path: String,
    /// Where a symlink such as `/dev/serial0` points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// USB manufacturer and product, when it is a USB adapter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// Stable `/dev/serial/by-id/...` names for it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub by_id: Vec<String>,
    /// Why this user cannot open it, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An IIO device (accelerometer, ADC, ...).
#[derive(Debug, Clone, Serialize)]
pub struct IioDevice {
    /// `iio:deviceN`.
    pub device: String,
    /// Its `name`, usable as the iio source's `device`.
    pub name: String,
    /// Channels with a `_raw` or `_input` file, e.g. `in_accel_x`.
    pub channels: Vec<String>,
}

/// Lists what is under the real `/dev` and `/sys`.
pub fn list() -> Listing {
    list_in(Path::new("/dev"), Path::new("/sys"))
}

/// Lists what is under `dev` (device nodes) and `sys` (sysfs), so tests can use a fake tree.
pub fn list_in(dev: &Path, sys: &Path) -> Listing {
    Listing {
        video: v4l2::list_devices(dev),
        serial: serial_ports(dev, sys),
        iio: iio_devices(&sys.join("bus/iio/devices")),
    }
}

/// Writes the listing as text or as one JSON object.
pub fn print(listing: &Listing, json: bool, out: &mut impl Write) -> io::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, listing)?;
        return writeln!(out);
    }
    writeln!(out, "Cameras (V4L2):")?;
    if !listing.video.iter().any(|d| d.capture) {
        writeln!(out, "  {NO_CAMERAS}")?;
    }
    for d in &listing.video {
        print_video(d, out)?;
    }
    writeln!(out, "\nSerial ports:")?;
    if listing.serial.is_empty() {
        writeln!(out, "  none found (/dev/ttyUSB*, /dev/ttyACM*, /dev/ttyAMA*, /dev/serial0)")?;
    }
    for p in &listing.serial {
        let mut line = format!("  {}", p.path);
        if let Some(t) = &p.target {
            line.push_str(&format!(" -> {t}"));
        }
        if let Some(prod) = &p.product {
            line.push_str(&format!("  {prod}"));
        }
        if let Some(e) = &p.error {
            line.push_str(&format!("  ({e})"));
        }
        writeln!(out, "{line}")?;
        for id in &p.by_id {
            writeln!(out, "    also {id}")?;
        }
    }
    writeln!(out, "\nIIO sensors:")?;
    if listing.iio.is_empty() {
        writeln!(out, "  none found (/sys/bus/iio/devices)")?;
    }
    for d in &listing.iio {
        let channels = if d.channels.is_empty() { "no channels".to_string() } else { d.channels.join(", ") };
        writeln!(out, "  {}  {}  channels: {channels}", d.device, d.name)?;
    }
    Ok(())
}

fn print_video(d: &VideoDevice, out: &mut impl Write) -> io::Result<()> {
    let name = d.card.as_deref().unwrap_or("?");
    if let Some(e) = &d.error {
        return writeln!(out, "  {}  cannot open: {}", d.path, e.strip_prefix(&format!("{}: ", d.path)).unwrap_or(e));
    }
    let about = format!("{} ({}, {})", name, d.driver.as_deref().unwrap_or("?"), d.bus.as_deref().unwrap_or("?"));
    if !d.capture {
        return writeln!(out, "  {}  {about}: not a camera (metadata, output or codec node)", d.path);
    }
    writeln!(out, "  {}  {about}", d.path)?;
    for f in &d.formats {
        let usable = if f.usable { "" } else { "  (not decoded by edgeinfer)" };
        writeln!(out, "    {} {}{usable}", f.fourcc, f.description)?;
        if let Some(e) = &f.error {
            writeln!(out, "      {e}")?;
        }
        if let Some(r) = &f.size_range {
            writeln!(
                out,
                "      {}x{} to {}x{} (step {}x{})",
                r.min_width, r.min_height, r.max_width, r.max_height, r.step_width, r.step_height
            )?;
        }
        for s in &f.sizes {
            let rates = match (&s.fps_range, s.fps.is_empty()) {
                (Some([lo, hi]), _) => format!("{lo}-{hi} fps"),
                (None, false) => format!("{} fps", s.fps.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", ")),
                (None, true) => "rates unknown".into(),
            };
            writeln!(out, "      {}x{} @ {rates}", s.width, s.height)?;
        }
    }
    Ok(())
}

/// `ttyUSB*`, `ttyACM*`, `ttyAMA*` and the `serial0`/`serial1` aliases under `dev`.
fn serial_ports(dev: &Path, sys: &Path) -> Vec<SerialPort> {
    let Ok(entries) = std::fs::read_dir(dev) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            ["ttyUSB", "ttyACM", "ttyAMA"].iter().any(|p| n.strip_prefix(p).is_some_and(is_number))
                || n == "serial0"
                || n == "serial1"
        })
        .collect();
    names.sort_by_key(|n| natural_key(n));
    let by_id = by_id_links(&dev.join("serial/by-id"));
    names
        .into_iter()
        .map(|name| {
            let path = dev.join(&name);
            let real = std::fs::canonicalize(&path).ok();
            let target = std::fs::symlink_metadata(&path)
                .ok()
                .filter(|m| m.file_type().is_symlink())
                .and(real.as_ref().map(|r| r.display().to_string()));
            let tty = real.as_ref().and_then(|r| r.file_name()).and_then(|n| n.to_str()).unwrap_or(&name).to_string();
            SerialPort {
                path: path.display().to_string(),
                target,
                product: usb_product(&sys.join("class/tty").join(&tty).join("device")),
                by_id: by_id.iter().filter(|(_, t)| Some(t) == real.as_ref()).map(|(l, _)| l.clone()).collect(),
                error: access_error(&path),
            }
        })
        .collect()
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Sorts `ttyUSB10` after `ttyUSB2`.
fn natural_key(name: &str) -> (String, u64) {
    let digits = name.len() - name.bytes().rev().take_while(u8::is_ascii_digit).count();
    (name[..digits].to_string(), name[digits..].parse().unwrap_or(0))
}

fn by_id_links(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut links: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.path().display().to_string(), std::fs::canonicalize(e.path()).ok()?)))
        .collect();
    links.sort();
    links
}

/// `manufacturer product` of the USB device above a tty's sysfs `device` link.
fn usb_product(device: &Path) -> Option<String> {
    // ttyACM: the link is the USB interface; ttyUSB: a child of it. The product is on the USB device.
    let mut dir = std::fs::canonicalize(device).ok()?;
    for _ in 0..3 {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok().map(|s| s.trim().to_string());
        if let Some(product) = read("product") {
            return Some(match read("manufacturer") {
                Some(m) if !m.is_empty() && !product.starts_with(&m) => format!("{m} {product}"),
                _ => product,
            });
        }
        dir = dir.parent()?.to_path_buf();
    }
    None
}

/// Why this process could not open `path` for reading and writing, if it could not.
fn access_error(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid NUL-terminated path; access(2) only reads it.
    if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) } == 0 {
        return None;
    }
    let e = io::Error::last_os_error();
    Some(if e.kind() == io::ErrorKind::PermissionDenied {
        let group = v4l2::file_group(path).unwrap_or_else(|| "dialout".into());
        format!("no access: sudo usermod -aG {group} $USER, then log in again")
    } else {
        e.to_string()
    })
}

/// `iio:device*` entries under `root` with their names and channels.
fn iio_devices(root: &Path) -> Vec<IioDevice> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut out: Vec<IioDevice> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let device = e.file_name().into_string().ok()?;
            if !device.starts_with("iio:device") {
                return None;
            }
            let dir = e.path();
            let name = std::fs::read_to_string(dir.join("name")).map(|s| s.trim().to_string()).unwrap_or_default();
            let mut channels: Vec<String> = std::fs::read_dir(&dir)
                .map(|files| {
                    files
                        .filter_map(Result::ok)
                        .filter_map(|f| f.file_name().into_string().ok())
                        .filter_map(|f| f.strip_suffix("_raw").or_else(|| f.strip_suffix("_input")).map(str::to_string))
                        .filter(|c| c.starts_with("in_"))
                        .collect()
                })
                .unwrap_or_default();
            channels.sort();
            channels.dedup();
            Some(IioDevice { device, name, channels })
        })
        .collect();
    out.sort_by_key(|d| natural_key(&d.device));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::v4l2::{VideoFormat, VideoSize};

    fn webcam() -> Listing {
        let size = |width, height, fps: &[f64]| VideoSize { width, height, fps: fps.to_vec(), fps_range: None };
        let format = |fourcc: &str, description: &str, usable, sizes| VideoFormat {
            fourcc: fourcc.into(),
            description: description.into(),
            usable,
            sizes,
            size_range: None,
            error: None,
        };
        let node = |path: &str, capture, formats, error: Option<&str>| VideoDevice {
            path: path.into(),
            card: error.is_none().then(|| "HD Pro Webcam C920".into()),
            driver: error.is_none().then(|| "uvcvideo".into()),
            bus: error.is_none().then(|| "usb-3f980000.usb-1.3".into()),
            capture,
            formats,
            error: error.map(str::to_string),
        };
        let formats = vec![
            format("MJPG", "Motion-JPEG", true, vec![size(640, 480, &[30.0, 15.0]), size(1920, 1080, &[30.0])]),
            format("YUYV", "YUYV 4:2:2", true, vec![size(640, 480, &[30.0, 7.5])]),
            format("H264", "H.264", false, vec![]),
        ];
        Listing {
            video: vec![
                node("/dev/video0", true, formats, None),
                node("/dev/video1", false, vec![], None),
                node("/dev/video2", false, vec![], Some("/dev/video2: permission denied (the device belongs to group `video`: sudo usermod -aG video $USER, then log in again)")),
            ],
            serial: vec![],
            iio: vec![],
        }
    }

    #[test]
    fn cameras_print_with_formats_sizes_and_rates() {
        let mut out = Vec::new();
        print(&webcam(), false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            "  /dev/video0  HD Pro Webcam C920 (uvcvideo, usb-3f980000.usb-1.3)\n    MJPG Motion-JPEG\n      640x480 @ 30, 15 fps\n",
            "    YUYV YUYV 4:2:2\n      640x480 @ 30, 7.5 fps\n",
            "    H264 H.264  (not decoded by edgeinfer)\n",
            "  /dev/video1  HD Pro Webcam C920 (uvcvideo, usb-3f980000.usb-1.3): not a camera",
            "  /dev/video2  cannot open: permission denied",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains(NO_CAMERAS), "a camera was listed");
        let mut json = Vec::new();
        print(&webcam(), true, &mut json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["video"][0]["formats"][0]["sizes"][0]["fps"][1], 15.0);
        assert_eq!(v["video"][2]["capture"], false);
    }

    #[test]
    fn serial_ports_and_iio_devices_from_a_fake_tree() {
        let root = tempfile::tempdir().unwrap();
        let (dev, sys) = (root.path().join("dev"), root.path().join("sys"));
        std::fs::create_dir_all(dev.join("serial/by-id")).unwrap();
        for n in ["ttyUSB10", "ttyUSB2", "ttyACM0", "ttyS0", "ttyUSBx", "video0"] {
            std::fs::write(dev.join(n), b"").unwrap();
        }
        std::os::unix::fs::symlink("ttyACM0", dev.join("serial0")).unwrap();
        std::os::unix::fs::symlink("../../ttyUSB2", dev.join("serial/by-id/usb-FTDI_FT232R-if00-port0")).unwrap();
        // sysfs: ttyUSB2's device is a child of a USB interface of a USB device with a product.
        let usb = sys.join("devices/usb1/1-1");
        std::fs::create_dir_all(usb.join("1-1:1.0/ttyUSB2")).unwrap();
        std::fs::write(usb.join("product"), "FT232R USB UART\n").unwrap();
        std::fs::write(usb.join("manufacturer"), "FTDI\n").unwrap();
        std::fs::create_dir_all(sys.join("class/tty/ttyUSB2")).unwrap();
        std::os::unix::fs::symlink(usb.join("1-1:1.0/ttyUSB2"), sys.join("class/tty/ttyUSB2/device")).unwrap();
        let iio = sys.join("bus/iio/devices");
        std::fs::create_dir_all(iio.join("iio:device0")).unwrap();
        std::fs::create_dir_all(iio.join("trigger0")).unwrap();
        std::fs::write(iio.join("iio:device0/name"), "lis3dh\n").unwrap();
        for f in ["in_accel_x_raw", "in_accel_y_raw", "in_accel_scale", "in_temp_input", "sampling_frequency"] {
            std::fs::write(iio.join("iio:device0").join(f), "1\n").unwrap();
        }

        let l = list_in(&dev, &sys);
        assert!(l.video.is_empty(), "a regular file is no camera");
        let paths: Vec<&str> = l.serial.iter().map(|p| p.path.rsplit('/').next().unwrap()).collect();
        assert_eq!(paths, ["serial0", "ttyACM0", "ttyUSB2", "ttyUSB10"]);
        assert!(l.serial[0].target.as_deref().unwrap().ends_with("/dev/ttyACM0"));
        let usb2 = &l.serial[2];
        assert_eq!(usb2.product.as_deref(), Some("FTDI FT232R USB UART"));
        assert_eq!(usb2.by_id.len(), 1);
        assert!(usb2.by_id[0].ends_with("usb-FTDI_FT232R-if00-port0"));
        assert_eq!(l.iio.len(), 1);
        assert_eq!(l.iio[0].name, "lis3dh");
        assert_eq!(l.iio[0].channels, ["in_accel_x", "in_accel_y", "in_temp"]);

        let mut text = Vec::new();
        print(&l, false, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains(NO_CAMERAS), "{text}");
        assert!(text.contains("ttyUSB2  FTDI FT232R USB UART"), "{text}");
        assert!(text.contains("iio:device0  lis3dh  channels: in_accel_x, in_accel_y, in_temp"), "{text}");
        let mut json = Vec::new();
        print(&l, true, &mut json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["serial"].as_array().unwrap().len(), 4);
        assert_eq!(v["iio"][0]["channels"][2], "in_temp");
    }
}
