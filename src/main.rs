//! The `edgeinfer` command line: parses arguments, sets up logging, calls the
//! library and maps errors to exit codes (0 ok, 1 some inputs failed, 2 the
//! command could not run: bad arguments, unloadable model, unreadable file).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use edgeinfer::cmd::{self, infer::InferArgs};
use edgeinfer::engine::{LoadOptions, Model};
use edgeinfer::postprocess::Softmax;
use edgeinfer::preprocess::{ColorOrder, ImagePrep, Layout, ResizeMode};

#[derive(Parser)]
#[command(
    name = "edgeinfer",
    version,
    about = "Run quantized ONNX models on edge devices and publish results over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: read inputs, infer, publish results (MQTT, stdout, file) until SIGINT/SIGTERM.
    Run {
        /// The TOML config file.
        config: PathBuf,
    },
    /// Validate a config without running it: keys, values, files, and that each model loads and fits.
    Check {
        /// The TOML config file.
        config: PathBuf,
    },
    /// Show a model's inputs and outputs (symbolic dimensions by name), operators, quantization; once pinned, kernels, plan, load time.
    Inspect {
        /// The model file: ONNX, or converted (.nnef.tgz / .nnef.tar).
        model: PathBuf,
        #[command(flatten)]
        shapes: ShapeArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the model once per input: images, .npy, .json files, directories (batch) or JSON arrays.
    Infer(Box<InferCli>),
    /// Measure load time, first inference, steady-state latency percentiles and peak memory.
    Bench {
        /// The model file: ONNX, or converted (.nnef.tgz / .nnef.tar).
        model: PathBuf,
        #[command(flatten)]
        shapes: ShapeArgs,
        /// Timed runs.
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// Untimed warm-up runs before the timed ones.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert an ONNX model into an analysed NNEF file (.nnef.tgz or .nnef.tar) that loads faster and without the ONNX parser.
    Convert {
        /// The ONNX model file.
        model: PathBuf,
        #[command(flatten)]
        shapes: ShapeArgs,
        /// Output file, ending in .nnef.tgz (gzipped) or .nnef.tar [default: MODEL with .nnef.tgz instead of .onnx]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List cameras (V4L2), serial ports and IIO sensors a config could use.
    Devices {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Sign models on a PC and check signatures, for boards with `[models] public_keys`.
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
}

#[derive(Subcommand)]
enum ModelAction {
    /// Make an ed25519 signing key: FILE (private, PKCS#8 PEM, mode 0600) and FILE.pub.
    Keygen {
        /// Where to write the private key (never over an existing file).
        #[arg(short, long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Sign a model: writes MODEL.sig (its SHA-256 and size, signed).
    Sign {
        /// The model file.
        model: PathBuf,
        /// The private key (from `edgeinfer model keygen` or `openssl genpkey -algorithm ed25519`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Signature file [default: MODEL.sig].
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Download a model over HTTPS into a directory, checking its SHA-256 (as update_model does).
    Fetch {
        /// The https:// URL of the model.
        url: String,
        /// Its SHA-256 (hex); the download is refused if it differs.
        #[arg(long)]
        sha256: String,
        /// Directory to write it into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// File name [default: the URL's last path segment].
        #[arg(long)]
        name: Option<String>,
        /// Also download URL.sig (the model's signature).
        #[arg(long)]
        signature: bool,
        /// CA certificates (PEM) to trust [default: the system's].
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Largest file accepted, in bytes.
        #[arg(long, default_value_t = edgeinfer::model_store::DEFAULT_MAX_BYTES)]
        max_bytes: u64,
    },
    /// Check a model's signature against trusted public keys, as a board would.
    Verify {
        /// The model file.
        model: PathBuf,
        /// A trusted public key, base64 (repeatable).
        #[arg(long = "public-key", value_name = "BASE64")]
        public_keys: Vec<String>,
        /// Signature file [default: MODEL.sig].
        #[arg(long, value_name = "FILE")]
        signature: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct ShapeArgs {
    /// Pin an input shape: NAME=D0,D1,... (or D0,D1,... for the first input); NAME= or NAME=scalar for a scalar. Repeatable.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    input_shape: Vec<String>,
    /// Size of a symbolic leading (batch) dimension.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Run a QDQ int8 model on float kernels: fold activation quantize/dequantize pairs into Clips.
    #[arg(long)]
    qdq_as_float: bool,
    /// Threads for tract's matrix products and edgeinfer's convolutions (1: no thread pool).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Start-up cache: load an ONNX model's cached analysed graph from DIR, or write it there.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

impl ShapeArgs {
    fn load_options(&self) -> anyhow::Result<LoadOptions> {
        let input_shapes = cmd::parse_input_shapes(&self.input_shape).map_err(anyhow::Error::msg)?;
        Ok(LoadOptions {
            input_shapes,
            batch: Some(self.batch),
            skip_warmup: false,
            qdq_as_float: self.qdq_as_float,
            threads: self.threads.into(),
            cache_dir: self.cache_dir.clone(),
        })
    }
}

#[derive(Args)]
struct InferCli {
    /// The model file: ONNX, or converted (.nnef.tgz / .nnef.tar).
    model: PathBuf,
    /// Inputs: image (.jpg/.png), .npy or .json files, directories, or a literal JSON array.
    inputs: Vec<String>,
    #[command(flatten)]
    shapes: ShapeArgs,
    /// Raw tensor mode: feed this .npy to the next model input, in graph order. Repeatable.
    #[arg(long, value_name = "FILE")]
    npy: Vec<PathBuf>,
    /// Raw tensor mode: write every output to DIR/out0.npy, DIR/out1.npy, ...
    #[arg(long, value_name = "DIR", requires = "npy")]
    save_npy: Option<PathBuf>,
    /// Image preprocessing settings from a TOML file (keys: resize, color, layout, scale, mean, std).
    #[arg(long, value_name = "FILE")]
    preprocess: Option<PathBuf>,
    /// How to fit images to the input size.
    #[arg(long, value_enum)]
    resize: Option<ResizeMode>,
    /// Channel order the model expects.
    #[arg(long, value_enum)]
    color: Option<ColorOrder>,
    /// Input layout (guessed from the shape when not given).
    #[arg(long, value_enum)]
    layout: Option<Layout>,
    /// Multiplier for 0..255 pixels (default 1/255).
    #[arg(long)]
    scale: Option<f32>,
    /// Per-channel mean, subtracted after scaling: R,G,B.
    #[arg(long, value_delimiter = ',', num_args = 3)]
    mean: Option<Vec<f32>>,
    /// Per-channel standard deviation, divided by after the mean: R,G,B.
    #[arg(long, value_delimiter = ',', num_args = 3)]
    std: Option<Vec<f32>>,
    /// Labels file, one per line (default: <model stem>.labels.txt next to the model).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Report the K best classes.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Print raw output tensors instead of classes.
    #[arg(long)]
    raw: bool,
    /// Softmax on class scores.
    #[arg(long, value_enum, default_value = "auto")]
    softmax: Softmax,
}

impl InferCli {
    fn image_prep(&self) -> anyhow::Result<ImagePrep> {
        let mut prep = match &self.preprocess {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", p.display(), e.to_string().trim()))?
            }
            None => ImagePrep::default(),
        };
        if let Some(v) = self.resize {
            prep.resize = v;
        }
        if let Some(v) = self.color {
            prep.color = v;
        }
        if self.layout.is_some() {
            prep.layout = self.layout;
        }
        if let Some(v) = self.scale {
            prep.scale = v;
        }
        if let Some(v) = &self.mean {
            prep.mean = [v[0], v[1], v[2]];
        }
        if let Some(v) = &self.std {
            if v.contains(&0.0) {
                anyhow::bail!("--std: a standard deviation of 0 would divide by zero");
            }
            prep.std = [v[0], v[1], v[2]];
        }
        Ok(prep)
    }
}

fn main() -> ExitCode {
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,tract_linalg=warn"));
    // The embedded broker logs every packet; its own failures reach us through broker::start.
    #[cfg(feature = "broker")]
    for target in edgeinfer::broker::LOG_TARGETS {
        logger.filter_module(target, log::LevelFilter::Off);
    }
    logger.format_timestamp_millis().init();
    // `--version` (not `-V`) also says which optional features are built in.
    let long_version: &'static str = Box::leak(edgeinfer::features::long_version().into_boxed_str());
    let matches = Cli::command().long_version(long_version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Replaces this process with a fresh run of the same binary and arguments (same PID, so
/// systemd and supervisors see a reload, not a crash). Returns only on failure.
fn restart_in_place() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "edgeinfer".into());
    // /proc/self/exe is this binary even if its file was replaced or removed since.
    let err = std::process::Command::new("/proc/self/exe").arg0(arg0).args(args).exec();
    anyhow::anyhow!("config reload: cannot restart in place: {err}")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Not locked for `run`: its stdout output is written by a thread of its own.
    let stdout = || std::io::stdout().lock();
    match cli.command {
        Command::Run { config } => {
            // SIGHUP means "reload" once the daemon listens for it; until then (loading models,
            // or right after a reload's exec) it must not kill the process.
            // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
            unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
            let cfg = edgeinfer::config::Config::load(&config)?;
            match edgeinfer::pipeline::run(cfg)? {
                edgeinfer::pipeline::RunEnd::Stopped => Ok(ExitCode::SUCCESS),
                edgeinfer::pipeline::RunEnd::Reload => Err(restart_in_place()),
            }
        }
        Command::Check { config } => {
            let cfg = edgeinfer::config::Config::load(&config)?;
            for line in edgeinfer::prepare::check(&cfg)? {
                println!("{line}");
            }
            println!("{}: ok", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { model, shapes, json } => {
            let report = cmd::inspect::inspect(&model, &shapes.load_options()?)?;
            cmd::inspect::print(&report, json, &mut stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { model, shapes, runs, warmup, json } => {
            let report = cmd::bench::measure(&model, &shapes.load_options()?, runs, warmup)?;
            cmd::bench::print(&report, json, &mut stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert { model, shapes, output, json } => {
            edgeinfer::features::require("onnx", "`edgeinfer convert` (it reads ONNX)").map_err(anyhow::Error::msg)?;
            let out = output.unwrap_or_else(|| cmd::convert::default_output(&model));
            let converted = edgeinfer::engine::convert(&model, &shapes.load_options()?, &out)?;
            cmd::convert::print(&model, &converted, json, &mut stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices { json } => {
            cmd::devices::print(&cmd::devices::list(), json, &mut stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Model { action } => {
            match action {
                ModelAction::Keygen { out } => cmd::model::keygen(&out, &mut stdout())?,
                ModelAction::Sign { model, key, output } => {
                    cmd::model::sign(&model, &key, output.as_deref(), &mut stdout())?;
                }
                ModelAction::Verify { model, public_keys, signature } => {
                    cmd::model::verify(&model, signature.as_deref(), &public_keys, &mut stdout())?
                }
                ModelAction::Fetch { url, sha256, dir, name, signature, ca_file, max_bytes } => {
                    let req = cmd::model::FetchArgs { url, sha256, dir, name, signature, ca_file, max_bytes };
                    cmd::model::fetch(&req, &mut stdout())?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Infer(args) => {
            let prep = args.image_prep()?;
            let opts = args.shapes.load_options()?;
            let model = if args.npy.is_empty() {
                Model::load(&args.model, &opts)?
            } else {
                cmd::infer::load_for_npy(&args.model, &opts, &args.npy)?
            };
            let infer_args = InferArgs {
                inputs: args.inputs.clone(),
                npy: args.npy.clone(),
                save_npy: args.save_npy.clone(),
                prep,
                labels: args.labels.clone(),
                top_k: args.top_k,
                raw: args.raw,
                softmax: args.softmax,
            };
            let summary = if infer_args.npy.is_empty() {
                cmd::infer::run_files(&model, &infer_args, &mut stdout(), &mut std::io::stderr())?
            } else {
                if !infer_args.inputs.is_empty() {
                    anyhow::bail!("give inputs either as --npy files or as positional files, not both");
                }
                cmd::infer::run_raw(&model, &infer_args, &mut stdout())?
            };
            Ok(if summary.failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
    }
}
