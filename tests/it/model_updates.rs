//! `update_model` end to end: a local HTTPS server (rustls, a test CA, nothing
//! from the internet) serves models signed with the real CLI; the daemon
//! downloads, verifies and swaps the good one and refuses, with a reply naming
//! why, a wrong hash, a signature by an untrusted key, a cut download, a model
//! of the wrong input shape and one that fails its reference check, while the
//! old model keeps serving.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{sha256_hex, signing_key, Daemon, Mosquitto, Subscriber};
use crate::tls::Pki;

const LONG: Duration = Duration::from_secs(60);

/// What the server answers for a path.
#[derive(Clone)]
enum Served {
    Whole(Vec<u8>),
    /// Announces the whole length, sends the first half, then closes.
    Cut(Vec<u8>),
}

/// A small HTTPS/1.1 file server on 127.0.0.1 with the test PKI's server certificate.
struct HttpsServer {
    port: u16,
    files: Arc<Mutex<HashMap<String, Served>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl HttpsServer {
    fn start(pki: &Pki) -> HttpsServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(pki.path("server.pem")).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let cfg = Arc::new(cfg);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let files: Arc<Mutex<HashMap<String, Served>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (f, r) = (files.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (cfg, files, requests) = (cfg.clone(), f.clone(), r.clone());
                std::thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(cfg).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, stream);
                    let mut reader = BufReader::new(&mut tls);
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return; // a client that refused our certificate
                    }
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    requests.lock().unwrap().push(path.clone());
                    let served = files.lock().unwrap().get(&path).cloned();
                    let _ = match served {
                        Some(Served::Whole(body)) => write!(
                            tls,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .and_then(|_| tls.write_all(&body)),
                        Some(Served::Cut(body)) => write!(
                            tls,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .and_then(|_| tls.write_all(&body[..body.len() / 2])),
                        None => {
                            tls.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        }
                    };
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        HttpsServer { port, files, requests }
    }

    fn serve(&self, path: &str, served: Served) -> String {
        self.files.lock().unwrap().insert(path.to_string(), served);
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

/// Signs a copy of `model` named `name` with `key` in `pc`; its bytes and signature.
fn signed(pc: &Path, model: &Path, name: &str, key: &Path) -> (Vec<u8>, Vec<u8>) {
    let copy = pc.join(name);
    std::fs::copy(model, &copy).unwrap();
    crate::support::sign(&copy, key);
    (std::fs::read(&copy).unwrap(), std::fs::read(pc.join(format!("{name}.sig"))).unwrap())
}

/// Sends `update_model` and waits for its reply.
fn update(sub: &mut Subscriber, id: &str, body: Value) -> Value {
    let mut body = body;
    body["id"] = json!(id);
    body["pipeline"] = json!("digits");
    sub.publish("edgeinfer/upd/cmd/update_model", serde_json::to_vec(&body).unwrap());
    sub.wait_for(LONG, |m| m.topic == "edgeinfer/upd/cmd/update_model/reply" && m.json()["id"] == id)
        .unwrap_or_else(|| panic!("no reply to {id}"))
        .json()
}

fn models_in_results(sub: &mut Subscriber, n: usize) -> Vec<String> {
    let start = sub.seen.len();
    let deadline = Instant::now() + LONG;
    loop {
        let names: Vec<String> = sub.seen[start..]
            .iter()
            .filter(|m| m.topic == "edgeinfer/upd/digits/result")
            .map(|m| m.json()["model"]["name"].as_str().unwrap_or("").to_string())
            .collect();
        if names.len() >= n || Instant::now() > deadline {
            return names;
        }
        let have = sub.seen.len();
        sub.collect(have + 1, Duration::from_millis(200), |_| true);
    }
}

#[test]
fn update_model_downloads_verifies_and_swaps_only_a_good_signed_model() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let server = HttpsServer::start(&pki);
    let root = tempfile::tempdir().unwrap();
    let (pc, board) = (root.path().join("pc"), root.path().join("board-models"));
    std::fs::create_dir_all(&pc).unwrap();
    std::fs::create_dir_all(&board).unwrap();
    let (key, public) = signing_key(&pc, "signer.key");
    let (stranger_key, _) = signing_key(&pc, "stranger.key");

    let float = crate::model("digits_cnn_f32.onnx");
    let (good, good_sig) = signed(&pc, &float, "digits_v3.onnx", &key);
    let good_url = server.serve("/m/digits_v3.onnx", Served::Whole(good.clone()));
    server.serve("/m/digits_v3.onnx.sig", Served::Whole(good_sig));
    let (stranger, stranger_sig) = signed(&pc, &float, "stranger.onnx", &stranger_key);
    let stranger_url = server.serve("/m/stranger.onnx", Served::Whole(stranger.clone()));
    server.serve("/m/stranger.onnx.sig", Served::Whole(stranger_sig));
    let (cut, cut_sig) = signed(&pc, &float, "cut.onnx", &key);
    let cut_url = server.serve("/m/cut.onnx", Served::Cut(cut.clone()));
    server.serve("/m/cut.onnx.sig", Served::Whole(cut_sig));
    let (vib, vib_sig) = signed(&pc, &crate::model("vibration_f32.onnx"), "vib.onnx", &key);
    let vib_url = server.serve("/m/vib.onnx", Served::Whole(vib.clone()));
    server.serve("/m/vib.onnx.sig", Served::Whole(vib_sig));
    let (badref, badref_sig) = signed(&pc, &float, "badref.onnx", &key);
    let badref_url = server.serve("/m/badref.onnx", Served::Whole(badref.clone()));
    server.serve("/m/badref.onnx.sig", Served::Whole(badref_sig));
    // The board's reference input for `badref` has the wrong shape: its check fails.
    let refdir = board.join("ref/badref");
    std::fs::create_dir_all(&refdir).unwrap();
    let wrong = edgeinfer::tensor::Tensor::zeros(&[1, 3], edgeinfer::tensor::ElemType::F32);
    wrong.write_npy(&refdir.join("in0.npy")).unwrap();
    // Limits: models.max_bytes just above the real models, one file over it, and a
    // signature over its 64 KiB limit beside a good model.
    let max_bytes = [&good, &stranger, &cut, &vib, &badref].iter().map(|b| b.len()).max().unwrap() + 1;
    let big = vec![7u8; max_bytes + 1];
    let big_url = server.serve("/m/big.onnx", Served::Whole(big.clone()));
    let (bigsig, _) = signed(&pc, &float, "bigsig.onnx", &key);
    let bigsig_url = server.serve("/m/bigsig.onnx", Served::Whole(bigsig.clone()));
    server.serve("/m/bigsig.onnx.sig", Served::Whole(vec![b'x'; 65 << 10]));

    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/upd/#");
    let daemon = Daemon::start(&format!(
        r#"
device = "upd"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[health]
interval_s = 0
[commands]
enabled = true
[models]
dir = "{board}"
public_keys = ["{public}"]
ca_file = "{ca}"
max_bytes = {max_bytes}
[[pipelines]]
name = "digits"
model = "{{models}}/digits_cnn_int8.onnx"
labels = "{{models}}/digits.labels.txt"
source = {{ type = "files", path = "{{models}}/samples/digits/digit_4_1.png", rate_hz = 20, loop = true }}
postprocess = {{ type = "classify", top_k = 3 }}
"#,
        port = broker.port,
        board = board.display(),
        ca = pki.path("ca.pem").display(),
    ));
    let first = models_in_results(&mut sub, 2);
    assert!(first.iter().all(|n| n == "digits_cnn_int8") && first.len() >= 2, "{first:?}; {}", daemon.stderr());

    let refused = |sub: &mut Subscriber, id: &str, body: Value, why: &str| {
        let r = update(sub, id, body);
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().unwrap().contains(why), "{id}: want `{why}`: {r}");
    };
    refused(&mut sub, "hash", json!({"url": good_url, "sha256": "0".repeat(64)}), "expected 0000");
    refused(
        &mut sub,
        "stranger",
        json!({"url": stranger_url, "sha256": sha256_hex(&stranger)}),
        "not in models.public_keys",
    );
    refused(&mut sub, "cut", json!({"url": cut_url, "sha256": sha256_hex(&cut)}), "GET https://127.0.0.1");
    refused(&mut sub, "shape", json!({"url": vib_url, "sha256": sha256_hex(&vib)}), "pipeline `digits`");
    refused(&mut sub, "ref", json!({"url": badref_url, "sha256": sha256_hex(&badref)}), "reference input");
    refused(
        &mut sub,
        "plain",
        json!({"url": good_url.replace("https", "http"), "sha256": sha256_hex(&good)}),
        "https:// only",
    );
    refused(&mut sub, "no-hash", json!({"url": good_url}), "`sha256` is missing");
    let over = format!("{} bytes, above models.max_bytes ({max_bytes})", big.len());
    refused(&mut sub, "big", json!({"url": big_url, "sha256": sha256_hex(&big)}), &over);
    let sig_over = "above the signature size limit (65536)";
    refused(&mut sub, "bigsig", json!({"url": bigsig_url, "sha256": sha256_hex(&bigsig)}), sig_over);
    // Nothing half-written stays behind; refused downloads never got their name.
    let names: Vec<String> =
        std::fs::read_dir(&board).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    let kept = |n: &String| {
        n.ends_with(".part")
            || ["cut.onnx", "digits_v3.onnx", "stranger.onnx", "big.onnx", "bigsig.onnx"].contains(&n.as_str())
    };
    assert!(!names.iter().any(kept), "{names:?}");
    let still = models_in_results(&mut sub, 2);
    assert!(still.iter().all(|n| n == "digits_cnn_int8") && !still.is_empty(), "{still:?}");

    let r = update(&mut sub, "good", json!({"url": good_url, "sha256": sha256_hex(&good)}));
    assert_eq!(r["ok"], true, "{r}; stderr: {}", daemon.stderr());
    let result = &r["result"];
    assert_eq!(result["model"], "digits_v3");
    assert_eq!(result["signed_by"], public.as_str());
    assert_eq!(result["downloaded"]["bytes"], good.len());
    assert_eq!(result["downloaded"]["reused"], false);
    assert_eq!(std::fs::read(board.join("digits_v3.onnx")).unwrap(), good);
    let after = models_in_results(&mut sub, 3);
    assert!(after.iter().all(|n| n == "digits_v3") && after.len() >= 3, "{after:?}");
    // Asked again: the file is there with that hash; only its signature is fetched again.
    let before = server.requests.lock().unwrap().len();
    let r = update(&mut sub, "again", json!({"url": good_url, "sha256": sha256_hex(&good)}));
    assert_eq!((r["ok"].clone(), r["result"]["downloaded"]["reused"].clone()), (json!(true), json!(true)), "{r}");
    assert_eq!(server.requests.lock().unwrap()[before..], ["/m/digits_v3.onnx.sig".to_string()]);

    // The same download from a PC: `edgeinfer model fetch`; a server the CA did not sign is refused.
    let fetched = root.path().join("fetched");
    std::fs::create_dir(&fetched).unwrap();
    let args = |ca: &str| {
        vec![
            "model".to_string(),
            "fetch".into(),
            good_url.clone(),
            "--sha256".into(),
            sha256_hex(&good),
            "--dir".into(),
            fetched.display().to_string(),
            "--signature".into(),
            "--ca-file".into(),
            pki.path(ca).display().to_string(),
        ]
    };
    let out = crate::support::edgeinfer().args(args("other-ca.pem")).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GET https://127.0.0.1") && err.to_lowercase().contains("certificate"), "{err}");
    let out = crate::support::edgeinfer().args(args("ca.pem")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(fetched.join("digits_v3.onnx")).unwrap(), good);
    assert!(fetched.join("digits_v3.onnx.sig").is_file());
}
