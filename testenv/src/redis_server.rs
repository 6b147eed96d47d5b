//! A private `redis-server` on a loopback port, for the tests and bench drills that make Redis
//! busy, restart it or kill its connections without disturbing anyone else's Redis; killed
//! on drop.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// A `redis-server --port PORT --bind 127.0.0.1 ARGS`, started (and started again after it
/// stopped) by [`RedisServer::start`].
pub struct RedisServer {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// The server's settings; nothing runs until [`RedisServer::start`].
    pub fn new(port: u16, args: &[&str]) -> Self {
        Self {
            port,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits (at most 10 s) until its port accepts connections.
    pub async fn start(&mut self) -> Result<(), Error> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(Error::RedisServerSpawn)?;
        self.child = Some(child);
        let port = self.port;
        let up = crate::eventually_every(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        if up {
            Ok(())
        } else {
            Err(Error::RedisServerNotListening(port))
        }
    }

    /// Waits (at most `within`) for the server to exit on its own (after `SHUTDOWN`); its exit
    /// status (success if it was not running).
    pub async fn exited(&mut self, within: Duration) -> Result<ExitStatus, Error> {
        let Some(child) = self.child.as_mut() else {
            return Ok(ExitStatus::default());
        };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > within {
                return Err(Error::RedisServerStillRunning(within));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server the way an orchestrator does (SIGTERM: it flushes and exits) and
    /// waits for it.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

/// A one-node Redis Cluster on a loopback port: a `redis-server --cluster-enabled yes` that
/// holds all 16,384 slots. Cluster rules apply — a command or script whose keys are in two
/// slots fails with `CROSSSLOT`, and a script that starts with `#!lua` may touch only the keys
/// it declares — while one plain connection reaches every key (no `MOVED`). Removed (process
/// and files) on drop.
pub struct OneNodeCluster {
    server: RedisServer,
    dir: std::path::PathBuf,
}

impl OneNodeCluster {
    /// Starts the node on `port` and waits (at most 10 s) until the cluster reports `ok`.
    pub async fn start(port: u16) -> Result<Self, Error> {
        let dir = std::env::temp_dir().join(format!("gh-cluster-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir_arg = dir.to_string_lossy().into_owned();
        let mut server = RedisServer::new(
            port,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--dir",
                &dir_arg,
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        );
        server.start().await?;
        let client = redis::Client::open(server.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query_async(&mut conn)
            .await?;
        let ready =
            crate::eventually_every(Duration::from_secs(10), Duration::from_millis(20), || {
                let mut conn = conn.clone();
                async move {
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default();
                    info.contains("cluster_state:ok")
                }
            })
            .await;
        if !ready {
            return Err(Error::RedisServerNotListening(port));
        }
        Ok(Self { server, dir })
    }

    pub fn url(&self) -> String {
        self.server.url()
    }
}

impl Drop for OneNodeCluster {
    fn drop(&mut self) {
        if let Some(child) = self.server.child.as_mut() {
            crate::kill(child);
        }
        self.server.child = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            crate::kill(child);
        }
    }
}
