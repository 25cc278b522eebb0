//! A socket wrapper that lets many HTTP/2 frames leave in one write.
//!
//! Under load, a gRPC connection carries many requests at once, and each answer (or, on a
//! client, each request) is finished by a task of its own. HTTP/2 (h2) writes out whatever
//! frames it holds every time its connection task runs, and tokio runs a task woken by another
//! task right after it (the "LIFO slot"). So the connection task ran once per answer and made
//! a write per answer: about two system calls per request, each a trip through the TCP stack
//! of both ends (BENCHMARKS.md, "Answers written together").
//!
//! [`Coalesced`] changes two things about the socket h2 sees:
//! - The first write after a flush yields once (the task wakes itself and returns `Pending`),
//!   which puts the connection task behind the tasks already queued on its worker. Those are
//!   usually the other answers of the same batch; they add their frames, and one write carries
//!   them all. With nothing queued the task is polled again at once, so a lone request pays
//!   one extra poll.
//! - It reports no vectored writes, so h2 copies payloads of up to 1 KiB into its 16 KiB frame
//!   buffer instead of chaining each as a slice of its own, which must be written out before
//!   h2 accepts the next frame.
//!
//! Reads pass through untouched. The yield waits on nothing but the scheduler: the task has
//! woken itself, so it is polled again. The node wraps every accepted connection
//! (`node::run`), and [`CoalescedConnector`] wraps the connections of our own clients (the CLI,
//! `wraft bench`, a follower forwarding to its leader; `scripts/etcd-bench` includes this file
//! so both load generators stay alike). Peer links (`transport.rs`) open plain channels: each
//! already carries one batch of raft messages per send.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::Uri;

/// A byte stream whose writes are held back for one scheduler pass after each flush.
#[derive(Debug)]
pub struct Coalesced<S> {
    inner: S,
    /// Set after a flush (and at the start): the next write yields once before going out.
    yield_before_write: bool,
}

impl<S> Coalesced<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            yield_before_write: true,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Yields once if this is the first write since the last flush.
    fn hold_back(&mut self, cx: &mut Context<'_>) -> bool {
        if self.yield_before_write {
            self.yield_before_write = false;
            cx.waker().wake_by_ref();
            return true;
        }
        false
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.hold_back(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.hold_back(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // h2 then copies payloads of up to 1 KiB into its frame buffer, so one write can
        // carry many small answers. A larger payload is still not copied: it leaves in a
        // write of its own after the buffered frames (two calls where one `writev` did).
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        if flushed.is_ready() {
            this.yield_before_write = true;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Coalesced<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Opens the TCP connections of a tonic `Channel` with [`Coalesced`] writes and `TCP_NODELAY`
/// (Nagle's algorithm with delayed ACKs puts ~40 ms under small requests). Pass it to
/// `Endpoint::connect_with_connector`; the endpoint's TLS and connect timeout still apply.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoalescedConnector;

type Connecting =
    Pin<Box<dyn Future<Output = io::Result<hyper_util::rt::TokioIo<Coalesced<TcpStream>>>> + Send>>;

impl tonic::codegen::Service<Uri> for CoalescedConnector {
    type Response = hyper_util::rt::TokioIo<Coalesced<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host"))
            })?;
            // A bracketed IPv6 literal is written `[::1]` in a URI but resolved without brackets.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(Coalesced::new(stream)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Waker;

    /// The write half of a socket, counting the writes that reach it.
    struct CountingWrites<S> {
        inner: S,
        writes: Arc<AtomicUsize>,
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for CountingWrites<S> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let CountingWrites { inner, writes } = self.get_mut();
            let written = Pin::new(inner).poll_write(cx, buf);
            if written.is_ready() {
                writes.fetch_add(1, Ordering::Relaxed);
            }
            written
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    struct CountWakes(AtomicUsize);

    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_first_write_after_a_flush_yields_once_and_wakes_itself() {
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let (near, _far) = tokio::io::duplex(1024);
        let mut s = Coalesced::new(near);
        let write = |s: &mut Coalesced<_>, cx: &mut Context<'_>| {
            Pin::new(s).poll_write(cx, b"frame").map(|r| r.ok())
        };

        assert_eq!(
            write(&mut s, &mut cx),
            Poll::Pending,
            "the first write yields"
        );
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "and is woken to try again"
        );
        assert_eq!(write(&mut s, &mut cx), Poll::Ready(Some(5)));
        assert_eq!(
            write(&mut s, &mut cx),
            Poll::Ready(Some(5)),
            "no yield before a flush"
        );
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_ready());
        assert_eq!(
            write(&mut s, &mut cx),
            Poll::Pending,
            "a flush re-arms the yield"
        );
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
        assert!(!s.is_write_vectored());
    }

    /// Serves `answers` HTTP/2 requests on one connection, answering them all at once from
    /// tasks of their own (as the node's answers arrive), and returns how many writes reached
    /// the server's socket while the client read the answers.
    async fn writes_for_answers_released_together(answers: usize, coalesce: bool) -> usize {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writes = Arc::new(AtomicUsize::new(0));
        let (released_tx, released_rx) = tokio::sync::oneshot::channel::<usize>();
        let server_writes = writes.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (read_half, write_half) = tcp.into_split();
            let counted = tokio::io::join(
                read_half,
                CountingWrites {
                    inner: write_half,
                    writes: server_writes.clone(),
                },
            );
            let io: Pin<Box<dyn AsyncReadWrite>> = if coalesce {
                Box::pin(Coalesced::new(counted))
            } else {
                Box::pin(counted)
            };
            let mut conn = h2::server::handshake(io).await.unwrap();
            let mut waiting = Vec::new();
            while waiting.len() < answers {
                let (_request, respond) = conn.accept().await.unwrap().unwrap();
                waiting.push(respond);
            }
            released_tx
                .send(server_writes.load(Ordering::Relaxed))
                .unwrap();
            for mut respond in waiting {
                tokio::spawn(async move {
                    let response = tonic::codegen::http::Response::new(());
                    let mut body = respond.send_response(response, false).unwrap();
                    body.send_data(bytes::Bytes::from(vec![7u8; 300]), true)
                        .unwrap();
                });
            }
            // Keep driving the connection until the client hangs up.
            while let Some(Ok(_)) = conn.accept().await {}
        });

        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let mut responses = Vec::new();
        for _ in 0..answers {
            let request = tonic::codegen::http::Request::get("http://test/")
                .body(())
                .unwrap();
            let (response, _) = client.send_request(request, true).unwrap();
            responses.push(response);
            client = client.ready().await.unwrap();
        }
        let before = released_rx.await.unwrap();
        for response in responses {
            let mut body = response.await.unwrap().into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
        }
        let during = writes.load(Ordering::Relaxed) - before;
        drop(client);
        let _ = server.await;
        during
    }

    trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
    impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}

    // One worker of the multi-threaded scheduler: a task woken by another runs right after it
    // (the LIFO slot, as on the node's runtime), and no second worker steals tasks, so the
    // plain socket takes one write per answer every time and the comparison is not luck.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn answers_finished_together_leave_in_a_few_writes() {
        const ANSWERS: usize = 64;
        let coalesced = writes_for_answers_released_together(ANSWERS, true).await;
        let plain = writes_for_answers_released_together(ANSWERS, false).await;
        eprintln!("{ANSWERS} answers: {coalesced} writes coalesced, {plain} plain");
        // The control: without the wrapper this setup writes once per answer. If h2 ever
        // stops doing that, this says so (and the wrapper may no longer be needed).
        assert!(
            plain >= ANSWERS / 2,
            "a plain socket took only {plain} writes for {ANSWERS} answers"
        );
        assert!(
            coalesced <= ANSWERS / 4,
            "{ANSWERS} answers took {coalesced} writes (plain socket: {plain})"
        );
    }
}
