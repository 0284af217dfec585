//! Test harness: a throw-away project folder, the real binary, transcripts with filters, and
//! a real HTTP server on loopback for the download tests.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cusa-pipe");

/// A temporary project folder with its own cache.
pub struct Project {
    pub dir: tempfile::TempDir,
}

/// Exit code and both streams of one command.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Project {
    pub fn new() -> Self {
        Project {
            dir: tempfile::tempdir().expect("a temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// Writes `pipeline.yaml` made of some of the quickstart's stages (as declared in the
    /// root pipeline.yaml) and `ours` (a YAML mapping of further stages).
    pub fn write_pipeline(&self, from_quickstart: &[&str], ours: &str) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let quickstart: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(root.join("pipeline.yaml")).unwrap())
                .unwrap();
        let mut stages = serde_yaml_ng::Mapping::new();
        for name in from_quickstart {
            stages.insert((*name).into(), quickstart["stages"][*name].clone());
        }
        stages.extend(serde_yaml_ng::from_str::<serde_yaml_ng::Mapping>(ours).unwrap());
        let mut doc = serde_yaml_ng::Mapping::new();
        doc.insert("version".into(), 1.into());
        doc.insert("stages".into(), serde_yaml_ng::Value::Mapping(stages));
        self.write("pipeline.yaml", &serde_yaml_ng::to_string(&doc).unwrap());
    }

    /// Adds (or replaces) the stages of the YAML mapping `stages` in `pipeline.yaml`.
    pub fn add_stages(&self, stages: &str) {
        let mut doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&self.read("pipeline.yaml")).unwrap();
        let extra: serde_yaml_ng::Mapping = serde_yaml_ng::from_str(stages).unwrap();
        let map = doc["stages"].as_mapping_mut().expect("a `stages:` mapping");
        for (name, stage) in extra {
            map.insert(name, stage);
        }
        self.write("pipeline.yaml", &serde_yaml_ng::to_string(&doc).unwrap());
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel))
            .unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_under(BIN, &[], args)
    }

    /// The binary run through `program pre…` (e.g. `unshare … sh -c '…' sh BIN`), with the same
    /// folder and environment as [`Project::command`]; `BIN` and `args` follow `pre`.
    pub fn command_under(&self, program: &str, pre: &[&str], args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(pre)
            .args((program != BIN).then_some(BIN))
            .args(args)
            .current_dir(self.path())
            .env_remove("CUSA_PIPE_CACHE")
            .env_remove("CUSA_PIPE_REMOTE")
            // No user config from the machine running the tests.
            .env("CUSA_PIPE_CONFIG", self.path().join(".cusa-pipe-user.yaml"))
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let out: Output = self.command(args).output().expect("the binary runs");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts the binary in the background.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts")
    }

    /// `$ cusa-pipe ARGS`, then stderr, stdout and the exit code, filtered.
    pub fn transcript(&self, args: &[&str]) -> String {
        let r = self.run(args);
        render(args, &r, self.path())
    }

    /// The newest log of `stage` (the run just made).
    pub fn latest_log(&self, stage: &str) -> String {
        let newest = std::fs::read_dir(self.path().join("cache/logs-v1").join(stage))
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap();
        std::fs::read_to_string(newest).unwrap()
    }

    /// The output folder of a committed stage.
    pub fn output(&self, stage: &str) -> PathBuf {
        let r = self.run(&["path", stage]);
        assert_eq!(r.code, 0, "path {stage}: {}", r.stderr);
        PathBuf::from(r.stdout.trim())
    }

    /// The `stages` of `run --json` output.
    pub fn stages(json: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"));
        v["stages"].as_array().unwrap().clone()
    }

    /// Outcomes by stage from `run --json` output.
    pub fn outcomes(json: &str) -> Vec<(String, String)> {
        Self::stages(json)
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["outcome"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

pub fn render(args: &[&str], r: &Run, project: &Path) -> String {
    let mut s = format!("$ cusa-pipe {}\n", args.join(" "));
    s.push_str(&r.stderr);
    s.push_str(&r.stdout);
    s.push_str(&format!("[exit {}]\n", r.code));
    filter(&s, project)
}

/// Replaces what changes from run to run: hashes, durations, paths, ports.
pub fn filter(s: &str, project: &Path) -> String {
    let project = project.to_string_lossy();
    let real = std::fs::canonicalize(project.as_ref())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = s
        .replace(&real, "[PROJECT]")
        .replace(project.as_ref(), "[PROJECT]");
    let rules: [(&str, &str); 5] = [
        (r"[0-9a-f]{64}", "[DIGEST]"),
        (r"\b[0-9a-f]{12}\b", "[HASH]"),
        (r"\b\d+(\.\d+)?s\b", "[TIME]"),
        (r"\d{4}-\d\d-\d\dT\d{6}Z-[^/\s]+\.log", "[LOG]"),
        (r"127\.0\.0\.1:\d+", "127.0.0.1:[PORT]"),
    ];
    for (pat, rep) in rules {
        out = regex::Regex::new(pat)
            .unwrap()
            .replace_all(&out, rep)
            .into_owned();
    }
    out
}

/// Waits until `path` exists (a stage's "I have started" marker).
pub fn wait_for(path: &Path, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < limit,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_child(child: Child) -> Run {
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// How the test server answers one request for a path.
#[derive(Clone)]
pub enum Reply {
    /// The body, honouring `Range: bytes=N-`.
    Body(Vec<u8>),
    Status(u16),
    /// Announce the full length, send only the first `n` bytes, close the connection.
    Cut(Vec<u8>, usize),
    /// Like `Cut`, then stop the whole server (the process "dies").
    CutAndDie(Vec<u8>, usize),
    /// Like `Body` (ranges honoured) but without ETag or Last-Modified: a dynamic server.
    NoValidator(Vec<u8>),
    /// Like `Cut`, without ETag or Last-Modified.
    CutNoValidator(Vec<u8>, usize),
}

/// Scripted replies per path.
type Routes = Mutex<Vec<(String, VecDeque<Reply>)>>;

/// A real HTTP/1.1 server on 127.0.0.1, answering from a script of replies per path (the
/// last reply repeats). It records each request line with its Range header.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    pub fn start(routes: Vec<(&str, Vec<Reply>)>) -> Self {
        Self::start_on("127.0.0.1:0", routes)
    }

    pub fn start_on(addr: &str, routes: Vec<(&str, Vec<Reply>)>) -> Self {
        let listener = TcpListener::bind(addr).expect("bind loopback");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Arc<Routes> = Arc::new(Mutex::new(
            routes
                .into_iter()
                .map(|(p, r)| (p.to_string(), r.into()))
                .collect(),
        ));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (req2, stop2) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if handle(stream, &routes, &req2) {
                            stop2.store(true, Ordering::SeqCst);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            // Dropping the listener closes the port: later connections are refused.
        });
        HttpServer {
            addr,
            requests,
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until the server thread has closed its port.
    pub fn wait_stopped(&self) {
        let start = Instant::now();
        while TcpStream::connect(self.addr).is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "server did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Whether a reply carries a validator (ETag).
enum ReplyKind {
    Validated,
    NoValidator,
}

/// Serves one connection (one request); returns true if the server must die.
fn handle(stream: TcpStream, routes: &Routes, log: &Mutex<Vec<String>>) -> bool {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    // Read bytes, not UTF-8: a TLS ClientHello must get a plain-text answer, as a real
    // plain-HTTP server would give.
    let mut raw = Vec::new();
    if reader.read_until(b'\n', &mut raw).is_err() {
        return false;
    }
    let line = String::from_utf8_lossy(&raw).into_owned();
    if !line.starts_with("GET ") {
        let mut stream = stream;
        let _ = stream.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        log.lock().unwrap().push("(not HTTP)".into());
        return false;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range: Option<u64> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            range = v.trim().trim_end_matches('-').parse().ok();
        }
    }
    log.lock().unwrap().push(match range {
        Some(r) => format!("GET {path} range={r}-"),
        None => format!("GET {path}"),
    });
    let reply = {
        let mut routes = routes.lock().unwrap();
        match routes.iter_mut().find(|(p, _)| *p == path) {
            Some((_, replies)) if replies.len() > 1 => replies.pop_front().unwrap(),
            Some((_, replies)) => replies.front().cloned().unwrap(),
            None => Reply::Status(404),
        }
    };
    let mut stream = stream;
    let dies = matches!(reply, Reply::CutAndDie(..));
    let reply_kind = match reply {
        Reply::NoValidator(_) | Reply::CutNoValidator(..) => ReplyKind::NoValidator,
        _ => ReplyKind::Validated,
    };
    match reply {
        Reply::Status(code) => {
            let _ = write!(
                stream,
                "HTTP/1.1 {code} Status\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            false
        }
        Reply::Body(body) | Reply::NoValidator(body) => {
            let etag = if matches!(reply_kind, ReplyKind::NoValidator) {
                ""
            } else {
                "ETag: \"v1\"\r\n"
            };
            let start = range.unwrap_or(0).min(body.len() as u64) as usize;
            let head = if range.is_some() {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\n{etag}Connection: close\r\n\r\n",
                    body.len() - start,
                    body.len().saturating_sub(1),
                    body.len()
                )
            } else {
                let kind = if path.ends_with('/') {
                    "text/html"
                } else {
                    "application/octet-stream"
                };
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{etag}Connection: close\r\n\r\n",
                    body.len()
                )
            };
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[start..]);
            false
        }
        Reply::Cut(body, n) | Reply::CutAndDie(body, n) | Reply::CutNoValidator(body, n) => {
            let etag = if matches!(reply_kind, ReplyKind::NoValidator) {
                ""
            } else {
                "ETag: \"v1\"\r\n"
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{etag}Connection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[..n]);
            let _ = stream.flush();
            dies
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// (ids, rows, schema metadata) of a feature file (`id` + `embedding` FixedSizeList of f32 or
/// f16, other columns ignored).
pub fn read_features(path: &Path) -> (Vec<String>, Vec<Vec<f32>>, HashMap<String, String>) {
    use arrow_array::{Array, FixedSizeListArray, Float16Array, Float32Array, StringArray};
    let file = std::fs::File::open(path).unwrap();
    let reader = arrow_ipc::reader::FileReader::try_new(file, None).unwrap();
    let meta = reader.schema().metadata().clone();
    let (mut ids, mut rows) = (Vec::new(), Vec::new());
    for batch in reader {
        let batch = batch.unwrap();
        let column = |name: &str| batch.column_by_name(name).unwrap().clone();
        let id = column("id");
        let id = id.as_any().downcast_ref::<StringArray>().unwrap();
        let emb = column("embedding");
        let emb = emb.as_any().downcast_ref::<FixedSizeListArray>().unwrap();
        for i in 0..batch.num_rows() {
            ids.push(id.value(i).to_string());
            let v = emb.value(i);
            rows.push(match v.as_any().downcast_ref::<Float32Array>() {
                Some(f) => f.values().to_vec(),
                None => v
                    .as_any()
                    .downcast_ref::<Float16Array>()
                    .unwrap()
                    .values()
                    .iter()
                    .map(|h| h.to_f32())
                    .collect(),
            });
        }
    }
    (ids, rows, meta.into())
}
