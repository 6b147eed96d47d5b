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

/// A cluster node on `port` keeping its `nodes.conf` in `dir`, without persistence; a primary
/// that stops answering is failed over after 2 s.
fn cluster_node(port: u16, dir: &str) -> RedisServer {
    RedisServer::new(
        port,
        &[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            "--dir",
            dir,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )
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
    /// [`OneNodeCluster::start`] on a port (and bus port, + 10,000) that is free and below the
    /// ephemeral range, trying other ports up to three times.
    pub async fn start_anywhere() -> Result<Self, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start(cluster_ports(1)[0]).await {
                Ok(cluster) => return Ok(cluster),
                Err(error) if attempt >= 3 => return Err(error),
                Err(_) => {}
            }
        }
    }

    /// Starts the node on `port` and waits (at most 10 s) until the cluster reports `ok`.
    pub async fn start(port: u16) -> Result<Self, Error> {
        let dir = std::env::temp_dir().join(format!("gh-cluster-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir_arg = dir.to_string_lossy().into_owned();
        let mut server = cluster_node(port, &dir_arg);
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

/// A Redis Cluster of `redis-server --cluster-enabled yes` processes on loopback ports, made
/// with `redis-cli --cluster create` (3 primaries at least, each with `replicas` replicas), as
/// the README's "Running on Redis Cluster" sets one up. Removed (processes and files) on drop.
pub struct LocalCluster {
    nodes: Vec<RedisServer>,
    dir: std::path::PathBuf,
}

/// Ports for cluster nodes: each free, and its cluster bus port (port + 10,000) free too.
/// Both are picked below the kernel's ephemeral range (32768 and up), where other tests' free
/// ports come from, so a node's bus port is never some other test's server port.
fn cluster_ports(n: usize) -> Vec<u16> {
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    let mut ports = Vec::new();
    while ports.len() < n {
        let port = rand::random_range(20_000..22_700u16);
        if !ports.contains(&port) && free(port) && free(port + 10_000) {
            ports.push(port);
        }
    }
    ports
}

impl LocalCluster {
    /// Starts `primaries × (1 + replicas)` nodes, creates the cluster and waits (at most 30 s)
    /// until every node reports it `ok` and every replica is in sync with its primary. Tries
    /// again on other ports (up to three times) if a port was taken meanwhile.
    pub async fn start(primaries: usize, replicas: usize) -> Result<Self, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(primaries, replicas).await {
                Ok(cluster) => return Ok(cluster),
                Err(error) if attempt >= 3 => return Err(error),
                Err(_) => {}
            }
        }
    }

    async fn start_once(primaries: usize, replicas: usize) -> Result<Self, Error> {
        let count = primaries * (1 + replicas);
        let ports = cluster_ports(count);
        let dir = std::env::temp_dir().join(format!(
            "gh-cluster-{}-{}",
            ports.first().copied().unwrap_or(0),
            std::process::id()
        ));
        let mut nodes = Vec::new();
        for port in &ports {
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir)?;
            let dir_arg = node_dir.to_string_lossy().into_owned();
            let mut server = cluster_node(*port, &dir_arg);
            server.start().await?;
            nodes.push(server);
        }
        let cluster = Self { nodes, dir };
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(Error::RedisServerSpawn)?;
        if !created.success() {
            return Err(Error::RedisServerNotListening(ports[0]));
        }
        let ready =
            crate::eventually_every(Duration::from_secs(30), Duration::from_millis(100), || {
                cluster.healthy()
            })
            .await;
        if !ready {
            return Err(Error::RedisServerNotListening(ports[0]));
        }
        Ok(cluster)
    }

    /// Whether every running node reports the cluster `ok` and every running replica's link to
    /// its primary is up.
    pub async fn healthy(&self) -> bool {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(client) = redis::Client::open(node.url()) else {
                return false;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return false;
            };
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !info.contains("cluster_state:ok") {
                return false;
            }
            let replication: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if replication.contains("role:slave") && !replication.contains("master_link_status:up")
            {
                return false;
            }
        }
        true
    }

    /// `REDIS_URL` for `REDIS_CLUSTER=true`: every node, comma-separated.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node that serves `slot` as primary now.
    pub async fn primary_of(&self, slot: u16) -> Option<usize> {
        for node in &self.nodes {
            if node.child.is_none() {
                continue;
            }
            let client = redis::Client::open(node.url()).ok()?;
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let Ok(slots) = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Vec<redis::Value>>(&mut conn)
                .await
            else {
                continue;
            };
            for range in slots {
                let redis::Value::Array(parts) = range else {
                    continue;
                };
                let (Some(redis::Value::Int(from)), Some(redis::Value::Int(to))) =
                    (parts.first(), parts.get(1))
                else {
                    continue;
                };
                if !(*from..=*to).contains(&i64::from(slot)) {
                    continue;
                }
                let Some(redis::Value::Array(primary)) = parts.get(2) else {
                    continue;
                };
                let Some(redis::Value::Int(port)) = primary.get(1) else {
                    continue;
                };
                return self.nodes.iter().position(|n| i64::from(n.port()) == *port);
            }
            return None;
        }
        None
    }

    /// `kill -9` of node `index`: no goodbye to the cluster, which fails it over.
    pub fn kill(&mut self, index: usize) {
        if let Some(node) = self.nodes.get_mut(index)
            && let Some(child) = node.child.as_mut()
        {
            crate::kill(child);
            node.child = None;
        }
    }

    /// Starts node `index` again after [`LocalCluster::kill`], with its own `nodes.conf`: it
    /// rejoins the cluster (as a replica of whoever took over its slots).
    pub async fn restart(&mut self, index: usize) -> Result<(), Error> {
        match self.nodes.get_mut(index) {
            Some(node) if node.child.is_none() => node.start().await,
            _ => Ok(()),
        }
    }

    /// The URL of node `index`.
    pub fn url(&self, index: usize) -> Option<String> {
        self.nodes.get(index).map(RedisServer::url)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                crate::kill(child);
            }
            node.child = None;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary and one replica on loopback ports, without persistence; their directories (a full
/// resynchronisation writes an RDB file there) are scratch ones, removed on drop.
pub struct ReplicatedRedis {
    pub primary: RedisServer,
    pub replica: RedisServer,
    dir: std::path::PathBuf,
}

impl ReplicatedRedis {
    /// Starts both and waits (at most 10 s) until the replica is in sync.
    pub async fn start() -> Result<Self, Error> {
        let dir = std::env::temp_dir().join(format!(
            "gh-replica-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        let (p_dir, r_dir) = (dir.join("primary"), dir.join("replica"));
        std::fs::create_dir_all(&p_dir)?;
        std::fs::create_dir_all(&r_dir)?;
        let (p_dir, r_dir) = (
            p_dir.to_string_lossy().into_owned(),
            r_dir.to_string_lossy().into_owned(),
        );
        let quiet = ["--save", "", "--appendonly", "no"];
        let mut primary = RedisServer::new(
            crate::free_port(),
            &[&quiet[..], &["--dir", &p_dir]].concat(),
        );
        primary.start().await?;
        let port = primary.port().to_string();
        let mut replica = RedisServer::new(
            crate::free_port(),
            &[
                &quiet[..],
                &["--dir", &r_dir, "--replicaof", "127.0.0.1", &port],
            ]
            .concat(),
        );
        replica.start().await?;
        let pair = Self {
            primary,
            replica,
            dir,
        };
        if pair.replica_in_sync().await {
            Ok(pair)
        } else {
            Err(Error::RedisServerNotListening(pair.replica.port()))
        }
    }

    /// Waits (at most 10 s) until the replica's link to the primary is up.
    pub async fn replica_in_sync(&self) -> bool {
        let url = self.replica.url();
        crate::eventually(Duration::from_secs(10), || {
            let url = url.clone();
            async move {
                let Ok(client) = redis::Client::open(url) else {
                    return false;
                };
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                    return false;
                };
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                info.contains("master_link_status:up")
            }
        })
        .await
    }
}

impl Drop for ReplicatedRedis {
    fn drop(&mut self) {
        self.replica.terminate();
        self.primary.terminate();
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
