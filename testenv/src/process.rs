//! The plumbing around `gatehouse` processes and loopback servers: where the built binary is,
//! running a CLI command to its end, stopping a process (SIGTERM, then at most SIGKILL), free
//! loopback ports, the HTTP client the tests and the bench use, and waiting for a condition or
//! a healthy `/healthz`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// The `gatehouse` binary of this build: nextest names it (`NEXTEST_BIN_EXE_gatehouse`, also
/// when it runs an archive elsewhere); otherwise it is the one next to the running executable
/// (the test binaries sit in `deps/`, one level below it).
pub fn gatehouse_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("NEXTEST_BIN_EXE_gatehouse") {
        return PathBuf::from(path);
    }
    match sibling_binary("gatehouse") {
        Ok(path) => path,
        Err(error) => panic!("{error}"),
    }
}

/// A binary built next to the running one (same target directory and profile), or in the
/// directory above it.
pub fn sibling_binary(name: &str) -> Result<PathBuf, Error> {
    let me = std::env::current_exe()?;
    let dir = me.parent().map(PathBuf::from).unwrap_or_default();
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(Error::BinaryNotFound {
        name: name.to_owned(),
        dir: dir.display().to_string(),
    })
}

/// Runs the built binary to completion with exactly `vars` as its environment and `stdin` as
/// its input (secrets go in there, never in argv).
pub fn run_cli(args: &[&str], vars: &HashMap<String, String>, stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new(gatehouse_bin())
        .args(args)
        .env_clear()
        .envs(vars.iter())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gatehouse");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("gatehouse runs")
}

/// An OpenAI-style chat completion whose one answer is `content` (the JSON a fake LLM on
/// loopback sends back).
pub fn chat_completion(content: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content },
            "finish_reason": "stop"
        }]
    })
}

/// The answer a fake LLM gives to every message in tests and benches: `order_status`, confident.
pub fn confident_order_status() -> serde_json::Value {
    chat_completion(
        &serde_json::json!({"intent": "order_status", "confidence": 0.95, "slots": {}}).to_string(),
    )
}

/// A child process killed when the test ends, also when it fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(&mut self.0);
    }
}

/// Sends SIGTERM and waits at most `within` for the process to exit; `None` if it did not
/// (it is left running).
pub fn terminate_within(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends SIGTERM and waits (at most 15 s) for the process to exit; kills it and panics if it
/// does not.
pub fn terminate(child: &mut Child) -> ExitStatus {
    match terminate_within(child, Duration::from_secs(15)) {
        Some(status) => status,
        None => {
            kill(child);
            panic!("process did not exit within 15 s of SIGTERM");
        }
    }
}

/// Kills (SIGKILL) and reaps a process: used where its in-flight work does not matter.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Where [`try_free_port`] picks: below the kernel's ephemeral range (32768 and up), which
/// every outgoing connection of every test (to PostgreSQL, Redis, a server under test) takes
/// its local port from, and below the Redis Cluster nodes' ports (20,000 and up, their bus
/// ports 10,000 higher).
const FREE_PORTS: std::ops::Range<u16> = 10_000..20_000;

/// A loopback port free at the time of asking, for a process a test starts (which binds it a
/// moment later). Picked at random in [`FREE_PORTS`], not by binding port 0: a port the kernel
/// hands out for port 0 comes from the ephemeral range, where another test's outgoing
/// connection can take it between this answer and the child's bind (a worker whose health port
/// is taken stops at once, and the test then waits for jobs nobody runs).
pub fn try_free_port() -> std::io::Result<u16> {
    for _ in 0..200 {
        let port = rand::random_range(FREE_PORTS);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    let socket = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?.port())
}

/// [`try_free_port`], for tests.
pub fn free_port() -> u16 {
    try_free_port().expect("a free loopback port")
}

/// The HTTP client settings of the tests and the bench: no proxy, redirects are not followed
/// (a redirect is an answer under test).
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
}

/// A client from [`client_builder`].
pub fn client() -> reqwest::Client {
    client_builder().build().expect("client")
}

/// Waits (at most `within`) until `url` answers 200; panics if it never does.
pub async fn wait_healthy(url: &str, within: Duration) {
    let http = client();
    let healthy = eventually(within, || async {
        matches!(http.get(url).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    assert!(healthy, "{url} never answered");
}

/// Waits until `check` holds or `within` passes (polling every 50 ms); returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_every(within, Duration::from_millis(50), check).await
}

/// [`eventually`], polling every `every`.
pub async fn eventually_every<F, Fut>(within: Duration, every: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() > within {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// User + system CPU time of a process so far, in microseconds (Linux `/proc`, whose clock
/// ticks are always 1/100 s).
pub fn process_cpu_us(pid: u32) -> Option<u64> {
    stat_cpu_us(
        &std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
        false,
    )
}

/// The CPU time in one `/proc/PID/stat` line, in microseconds: utime + stime, plus the
/// children it reaped (cutime + cstime) when `reaped`.
pub fn stat_cpu_us(stat: &str, reaped: bool) -> Option<u64> {
    // Fields after the parenthesised command name: utime 14, stime 15, cutime 16, cstime 17.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let own = field(11)? + field(12)?;
    let children = if reaped { field(13)? + field(14)? } else { 0 };
    Some((own + children) * 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // pid (comm with ") " inside) state ppid … utime=7 stime=3 cutime=20 cstime=10
        let stat = "42 (post gres) x) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 20 10 20 0 1 0";
        assert_eq!(stat_cpu_us(stat, false), Some(100_000));
        assert_eq!(stat_cpu_us(stat, true), Some(400_000));
    }
}
