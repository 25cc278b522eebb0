//! Fault-injecting TCP proxies for node-to-node links, in userspace on loopback.
//!
//! A [`Network`] holds one [`LinkProxy`] per *directed* link: node `i` reaches node `j` through
//! `--dial j=127.0.0.1:PROXY_ij`, and that proxy forwards to `j`'s real listen port. Because both
//! raft traffic and the forwarding of client requests to the leader use `--dial`, a cut link cuts
//! both. Client connections from the test go to the nodes directly and are never faulted.
//!
//! Each link can be switched at run time, from the test:
//! - [`LinkProxy::cut`]: open connections are closed and new ones are closed as soon as they are
//!   accepted (the peer sees a refused/reset connection at once).
//! - [`LinkProxy::blackhole`]: bytes on open connections are dropped and new connections are
//!   accepted and held without forwarding anything (the peer sees a hang, then its timeouts).
//! - [`LinkProxy::delay`]: every chunk is forwarded `d` after it was read (a delay line: latency,
//!   not a throughput limit; order is kept).
//! - [`LinkProxy::flaky`]: every open connection of the link is closed at random moments
//!   (100-1000 ms apart, from a seeded generator).
//! - [`LinkProxy::heal`]: back to a plain pipe, closing connections that lost bytes.
//!
//! Invariant: a byte is either forwarded in order or its connection is closed; a proxy never
//! forwards a stream with a hole in it (that would be corruption, not a network fault).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cluster::NodeId;

/// Chunks in flight in one direction of a delayed connection before reading pauses.
const DELAY_LINE_CHUNKS: usize = 1024;
/// How long a flaky link keeps its connections, at least and at most.
const FLAKY_MIN: Duration = Duration::from_millis(100);
const FLAKY_MAX: Duration = Duration::from_millis(1000);

/// What a link does with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards.
    Open,
    /// Closes every connection.
    Cut,
    /// Drops bytes and holds connections open.
    Blackhole,
}

/// The settings of one link at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    pub mode: Mode,
    pub delay: Duration,
    pub flaky: bool,
}

impl Default for LinkState {
    fn default() -> Self {
        LinkState {
            mode: Mode::Open,
            delay: Duration::ZERO,
            flaky: false,
        }
    }
}

/// Shared between a proxy's handle and its tasks.
struct Control {
    /// A std mutex: held only to copy or change the settings, never across an await.
    state: Mutex<LinkState>,
    /// Where new connections go (`127.0.0.1:PORT`): a node that joins on a port of its own
    /// moves the links to it ([`Network::retarget`]).
    target: Mutex<String>,
    /// Bumped to close every connection open at that moment.
    epoch: watch::Sender<u64>,
    /// Seeded, so that a flaky schedule can be replayed from the test's seed.
    rng: Mutex<StdRng>,
    /// The task that resets connections while the link is flaky.
    flaky_task: Mutex<Option<JoinHandle<()>>>,
}

impl Control {
    fn state(&self) -> LinkState {
        *self.state.lock().unwrap()
    }

    fn target(&self) -> String {
        self.target.lock().unwrap().clone()
    }

    fn close_all(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }
}

/// One directed link's proxy: listens on its own loopback port and forwards to `target`.
pub struct LinkProxy {
    from: NodeId,
    to: NodeId,
    port: u16,
    ctl: Arc<Control>,
    accept_task: JoinHandle<()>,
}

impl LinkProxy {
    /// Binds `127.0.0.1:0` and starts forwarding to `target` (`127.0.0.1:PORT`). Must be called
    /// inside a tokio runtime.
    pub fn start(from: NodeId, to: NodeId, target: String, seed: u64) -> LinkProxy {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding a proxy on 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("making a listener non-blocking");
        let port = std_listener.local_addr().expect("local address").port();
        let listener = TcpListener::from_std(std_listener).expect("registering a listener");
        let ctl = Arc::new(Control {
            state: Mutex::new(LinkState::default()),
            target: Mutex::new(target),
            epoch: watch::channel(0).0,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            flaky_task: Mutex::new(None),
        });
        let accept_task = tokio::spawn(accept_loop(listener, ctl.clone()));
        LinkProxy {
            from,
            to,
            port,
            ctl,
            accept_task,
        }
    }

    /// The port node `from` dials to reach node `to`.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> LinkState {
        self.ctl.state()
    }

    /// Closes open connections and every new one.
    pub fn cut(&self) {
        self.ctl.state.lock().unwrap().mode = Mode::Cut;
        self.ctl.close_all();
    }

    /// Drops every byte and holds connections open.
    pub fn blackhole(&self) {
        self.ctl.state.lock().unwrap().mode = Mode::Blackhole;
    }

    /// Forwards each chunk `delay` after it was read (zero: no delay).
    pub fn delay(&self, delay: Duration) {
        self.ctl.state.lock().unwrap().delay = delay;
    }

    /// Starts or stops closing the link's connections at random moments.
    pub fn flaky(&self, on: bool) {
        self.ctl.state.lock().unwrap().flaky = on;
        let mut task = self.ctl.flaky_task.lock().unwrap();
        if let Some(t) = task.take() {
            t.abort();
        }
        if on {
            *task = Some(tokio::spawn(flaky_loop(self.ctl.clone())));
        }
    }

    /// Back to a plain pipe: forwards, no delay, not flaky. Connections that may have lost bytes
    /// (held by a blackhole, or pumped while cut) are closed.
    pub fn heal(&self) {
        self.flaky(false);
        let before = {
            let mut state = self.ctl.state.lock().unwrap();
            let before = *state;
            *state = LinkState::default();
            before
        };
        if before.mode != Mode::Open {
            self.ctl.close_all();
        }
    }
}

impl fmt::Debug for LinkProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "link {}->{} (:{}) {:?}",
            self.from,
            self.to,
            self.port,
            self.state()
        )
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.flaky(false);
        self.ctl.state.lock().unwrap().mode = Mode::Cut;
        self.ctl.close_all();
    }
}

async fn accept_loop(listener: TcpListener, ctl: Arc<Control>) {
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors and the like: back off rather than spin.
                eprintln!("proxy to {}: accept failed: {err}", ctl.target());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Subscribed before the mode is read: a heal or cut landing in between must still
        // reach this connection (it would otherwise be held, or pumped, past it).
        let epoch = ctl.epoch.subscribe();
        match ctl.state().mode {
            Mode::Cut => drop(inbound),
            Mode::Blackhole => {
                tokio::spawn(hold(inbound, epoch));
            }
            Mode::Open => {
                tokio::spawn(connection(inbound, ctl.target(), ctl.clone(), epoch));
            }
        }
    }
}

/// Resets the link's connections at random moments until aborted.
async fn flaky_loop(ctl: Arc<Control>) {
    loop {
        let wait = {
            let mut rng = ctl.rng.lock().unwrap();
            rng.random_range(FLAKY_MIN..=FLAKY_MAX)
        };
        tokio::time::sleep(wait).await;
        ctl.close_all();
    }
}

/// A blackholed new connection: read and discard until the link changes epoch (heal, cut).
async fn hold(mut inbound: TcpStream, mut epoch: watch::Receiver<u64>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            _ = epoch.changed() => return,
            n = inbound.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

async fn connection(
    inbound: TcpStream,
    target: String,
    ctl: Arc<Control>,
    mut epoch: watch::Receiver<u64>,
) {
    let outbound = tokio::select! {
        _ = epoch.changed() => return,
        c = TcpStream::connect(&target) => match c {
            Ok(c) => c,
            Err(_) => return, // the node is down: the dialer sees its connection closed
        },
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_rd, in_wr) = inbound.into_split();
    let (out_rd, out_wr) = outbound.into_split();
    // Dropping this future (either direction ended, or the epoch changed) closes both sockets.
    tokio::select! {
        _ = epoch.changed() => {}
        _ = pump(in_rd, out_wr, &ctl) => {}
        _ = pump(out_rd, in_wr, &ctl) => {}
    }
}

/// Copies one direction through a delay line until either end closes.
async fn pump(mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf, ctl: &Control) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(DELAY_LINE_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let state = ctl.state();
            if state.mode != Mode::Open {
                // Blackholed (a cut closes the connection): the bytes are lost, and the
                // connection is closed on heal.
                continue;
            }
            if tx
                .send((Instant::now() + state.delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // Either half ending ends the direction: a reader at EOF with chunks still in the line
    // loses them, which only matters on a connection that is closing anyway.
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}

/// Proxies on every directed link between a set of nodes.
pub struct Network {
    links: BTreeMap<(NodeId, NodeId), LinkProxy>,
}

impl Network {
    /// One proxy per ordered pair of distinct nodes; `targets` gives each node's listen port.
    /// Each link's random generator is derived from `seed` and the link.
    pub fn start(targets: &[(NodeId, u16)], seed: u64) -> Network {
        let mut links = BTreeMap::new();
        for &(from, _) in targets {
            for &(to, port) in targets {
                if from != to {
                    let link_seed = seed ^ (from << 32) ^ (to << 16) ^ 0x9e37_79b9_7f4a_7c15;
                    links.insert(
                        (from, to),
                        LinkProxy::start(from, to, format!("127.0.0.1:{port}"), link_seed),
                    );
                }
            }
        }
        Network { links }
    }

    /// The proxy node `from` uses to reach node `to`.
    pub fn link(&self, from: NodeId, to: NodeId) -> &LinkProxy {
        self.links
            .get(&(from, to))
            .unwrap_or_else(|| panic!("no proxied link {from}->{to}"))
    }

    /// Every link, in (from, to) order.
    pub fn links(&self) -> impl Iterator<Item = &LinkProxy> {
        self.links.values()
    }

    /// Points every link to node `to` at `port` from now on (connections open now stay where
    /// they are): for a node that joins on a port other than the one the links were made for.
    pub fn retarget(&self, to: NodeId, port: u16) {
        for ((_, t), link) in &self.links {
            if *t == to {
                *link.ctl.target.lock().unwrap() = format!("127.0.0.1:{port}");
            }
        }
    }

    /// Whether node `id` has proxies on its links (an initial node, or a spare id).
    pub fn has(&self, id: NodeId) -> bool {
        self.links.keys().any(|(from, _)| *from == id)
    }

    /// The `--dial` value of node `from`: every peer through its proxy.
    pub fn dial_arg(&self, from: NodeId) -> String {
        self.links
            .iter()
            .filter(|((f, _), _)| *f == from)
            .map(|((_, to), link)| format!("{to}=127.0.0.1:{}", link.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The links between `a` and `b`, both directions.
    fn between(&self, a: &[NodeId], b: &[NodeId]) -> Vec<&LinkProxy> {
        let mut out = Vec::new();
        for &x in a {
            for &y in b {
                if x != y {
                    out.push(self.link(x, y));
                    out.push(self.link(y, x));
                }
            }
        }
        out
    }

    /// Cuts every link between the groups `a` and `b`, both directions.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        for link in self.between(a, b) {
            link.cut();
        }
    }

    /// Cuts every link of `id`, both directions.
    pub fn isolate(&self, id: NodeId) {
        for link in self.links.values() {
            if link.from == id || link.to == id {
                link.cut();
            }
        }
    }

    /// Blackholes every link between the groups `a` and `b`, both directions.
    pub fn blackhole(&self, a: &[NodeId], b: &[NodeId]) {
        for link in self.between(a, b) {
            link.blackhole();
        }
    }

    /// Delays every link to and from `id`.
    pub fn delay_node(&self, id: NodeId, delay: Duration) {
        for link in self.links.values() {
            if link.from == id || link.to == id {
                link.delay(delay);
            }
        }
    }

    /// Heals every link.
    pub fn heal_all(&self) {
        for link in self.links.values() {
            link.heal();
        }
    }

    /// The links that are not plain pipes, for failure messages.
    pub fn describe(&self) -> String {
        let faulty: Vec<String> = self
            .links
            .values()
            .filter(|l| l.state() != LinkState::default())
            .map(|l| format!("{l:?}"))
            .collect();
        if faulty.is_empty() {
            "all links healthy".into()
        } else {
            faulty.join("; ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; returns its port.
    async fn echo_server() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        port
    }

    async fn roundtrip(port: u16, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn forwards_cuts_and_heals() {
        let target = echo_server().await;
        let proxy = LinkProxy::start(1, 2, format!("127.0.0.1:{target}"), 7);
        let got = tokio::time::timeout(T, roundtrip(proxy.port(), b"hello"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"hello");

        // An open connection is closed by a cut.
        let mut open = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        open.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        tokio::time::timeout(T, open.read_exact(&mut one))
            .await
            .unwrap()
            .unwrap();
        proxy.cut();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(T, open.read_to_end(&mut rest))
            .await
            .expect("a cut closes open connections");
        assert!(closed.is_err() || rest.is_empty(), "{closed:?} {rest:?}");

        // New connections fail while cut.
        let cut = tokio::time::timeout(T, roundtrip(proxy.port(), b"y"))
            .await
            .unwrap();
        assert!(cut.is_err(), "a cut link forwarded: {cut:?}");

        proxy.heal();
        let got = tokio::time::timeout(T, roundtrip(proxy.port(), b"again"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"again");
    }

    #[tokio::test]
    async fn blackhole_holds_then_heal_closes() {
        let target = echo_server().await;
        let proxy = LinkProxy::start(1, 2, format!("127.0.0.1:{target}"), 7);
        proxy.blackhole();
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        s.write_all(b"lost").await.unwrap();
        let mut buf = [0u8; 4];
        // Nothing comes back while blackholed (a short wait: the absence cannot be awaited).
        let silent = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(silent.is_err(), "a blackholed link answered: {silent:?}");
        proxy.heal();
        let end = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap();
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    }

    #[tokio::test]
    async fn delay_keeps_order_and_flaky_resets() {
        let target = echo_server().await;
        let proxy = LinkProxy::start(1, 2, format!("127.0.0.1:{target}"), 7);
        proxy.delay(Duration::from_millis(20));
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        let msg: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        for chunk in msg.chunks(100) {
            s.write_all(chunk).await.unwrap();
        }
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(T, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);

        proxy.flaky(true);
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(T, s.read_to_end(&mut rest))
            .await
            .expect("a flaky link closes its connections within a second");
        assert!(closed.is_err() || rest.is_empty(), "{closed:?}");
    }
}
