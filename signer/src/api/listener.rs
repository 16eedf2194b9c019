//! The gRPC port's front door: TCP accept, the TLS handshake (which requires a client X509-SVID, see [`super::tls`]),
//! and the bounds that keep a flood of peers from costing more than a fixed amount of memory.
//!
//! - At most `max_connections` connections are open or handshaking at once; a peer beyond that is closed at once.
//! - A handshake that does not finish within [`HANDSHAKE_TIMEOUT`] is dropped.
//! - Every peer refused before authentication (no certificate, an untrusted one, a handshake that failed or timed
//!   out, the connection limit) is counted in `signet_unauthenticated_refusals_total{reason}` and tallied per peer
//!   address; [`RefusalTally::flush`] turns the tally into one audit line per peer per interval, so a flood cannot
//!   fill the disk. The tally itself holds at most [`MAX_TALLIED_PEERS`] addresses; further ones are counted together.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::audit::{AuditLog, AuditRecord, Outcome};

/// How long a peer has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most peer addresses the refusal tally tells apart within one interval.
pub const MAX_TALLIED_PEERS: usize = 1024;

/// Why a peer was refused before it was authenticated (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalReason {
    /// It presented no client certificate.
    NoCertificate,
    /// Its certificate does not chain to the trust domain's roots or is not an X509-SVID of it.
    UntrustedCertificate,
    /// The handshake failed otherwise (protocol, version, garbage).
    Handshake,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// The connection limit was reached.
    ConnectionLimit,
}

impl RefusalReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::NoCertificate => "no_certificate",
            RefusalReason::UntrustedCertificate => "untrusted_certificate",
            RefusalReason::Handshake => "handshake",
            RefusalReason::HandshakeTimeout => "handshake_timeout",
            RefusalReason::ConnectionLimit => "connection_limit",
        }
    }

    /// The reason of a failed TLS handshake.
    fn of_handshake(e: &io::Error) -> Self {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::NoCertificatesPresented) => RefusalReason::NoCertificate,
            Some(rustls::Error::InvalidCertificate(_)) => RefusalReason::UntrustedCertificate,
            _ => RefusalReason::Handshake,
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    count: u64,
    by_reason: HashMap<&'static str, u64>,
    last: String,
}

impl Tally {
    fn add(&mut self, reason: RefusalReason, detail: &str) {
        self.count += 1;
        *self.by_reason.entry(reason.label()).or_insert(0) += 1;
        detail.clone_into(&mut self.last);
    }

    fn line(&self, peer: &str, interval: Duration) -> AuditRecord {
        let mut reasons: Vec<String> = self
            .by_reason
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        reasons.sort();
        let mut r = AuditRecord::new("", "tls", "handshake", Outcome::Refused);
        r.code = Some("UNAUTHENTICATED");
        r.peer = Some(peer.to_string());
        r.reason = Some(format!(
            "{} connection(s) refused before authentication in the last {}s ({}); last: {}",
            self.count,
            interval.as_secs().max(1),
            reasons.join(", "),
            self.last
        ));
        r
    }
}

/// Refusals before authentication, per peer address, until the next flush.
#[derive(Debug, Default)]
pub struct RefusalTally {
    inner: Mutex<(HashMap<IpAddr, Tally>, Tally)>,
}

impl RefusalTally {
    /// Counts a refusal of `peer`.
    pub fn note(&self, peer: IpAddr, reason: RefusalReason, detail: &str) {
        metrics::counter!("signet_unauthenticated_refusals_total", "reason" => reason.label())
            .increment(1);
        tracing::debug!(%peer, reason = reason.label(), detail, "peer refused before authentication");
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (peers, others) = &mut *g;
        if let Some(t) = peers.get_mut(&peer) {
            t.add(reason, detail);
        } else if peers.len() < MAX_TALLIED_PEERS {
            peers.entry(peer).or_default().add(reason, detail);
        } else {
            others.add(reason, detail);
        }
    }

    /// The audit lines of the interval that ends now (one per peer, one for the peers beyond the tally's bound),
    /// and a fresh tally.
    pub fn drain(&self, interval: Duration) -> Vec<AuditRecord> {
        let (peers, others) = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *g)
        };
        let mut lines: Vec<AuditRecord> = peers
            .iter()
            .map(|(ip, t)| t.line(&ip.to_string(), interval))
            .collect();
        if others.count > 0 {
            lines.push(others.line("other peers", interval));
        }
        lines
    }

    /// Writes the interval's lines to `audit`.
    pub async fn flush(&self, audit: &AuditLog, interval: Duration) {
        let lines = self.drain(interval);
        if let Err(e) = audit.record(&lines).await {
            tracing::error!(error = %e, "cannot audit the refusals of unauthenticated peers");
        }
    }
}

/// Flushes `tally` to `audit` every `interval`, and once more at shutdown.
pub async fn audit_refusals(
    tally: Arc<RefusalTally>,
    audit: AuditLog,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => tally.flush(&audit, interval).await,
            () = crate::shutdown::until_shutdown(&mut shutdown) => {
                tally.flush(&audit, interval).await;
                return;
            }
        }
    }
}

/// An authenticated TLS connection, holding its place among the open connections until it closes.
#[derive(Debug)]
pub struct Admitted {
    inner: TlsStream<TcpStream>,
    _place: OwnedSemaphorePermit,
}

impl Connected for Admitted {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections on `listener`, at most `max_connections` at once, hands the ones whose handshake
/// authenticated the peer to `tx` (tonic's incoming stream), and tallies the others in `refusals`.
pub async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    max_connections: usize,
    refusals: Arc<RefusalTally>,
    tx: mpsc::Sender<Result<Admitted, io::Error>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(max_connections.max(1)));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Ok(place) = places.clone().try_acquire_owned() else {
                        refusals.note(
                            peer.ip(),
                            RefusalReason::ConnectionLimit,
                            &format!("{max_connections} connections are open, the most allowed"),
                        );
                        drop(tcp);
                        continue;
                    };
                    // HTTP/2 writes a response in several small frames: without TCP_NODELAY, Nagle's algorithm holds
                    // the last of them until the client's delayed ACK (up to 40 ms a small request).
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
                    }
                    let (acceptor, tx, refusals) = (acceptor.clone(), tx.clone(), refusals.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(Ok(Admitted { inner: tls, _place: place })).await;
                            }
                            Ok(Err(e)) => {
                                refusals.note(peer.ip(), RefusalReason::of_handshake(&e), &e.to_string());
                            }
                            Err(_) => refusals.note(
                                peer.ip(),
                                RefusalReason::HandshakeTimeout,
                                "the TLS handshake did not finish in time",
                            ),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = crate::shutdown::until_shutdown(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_is_one_line_per_peer_and_bounded() {
        let t = RefusalTally::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..1000 {
            t.note(a, RefusalReason::NoCertificate, "no certificate");
        }
        t.note(a, RefusalReason::UntrustedCertificate, "bad chain");
        for i in 0..(MAX_TALLIED_PEERS as u32 + 10) {
            t.note(IpAddr::from(i.to_be_bytes()), RefusalReason::Handshake, "x");
        }
        let lines = t.drain(Duration::from_secs(60));
        assert_eq!(
            lines.len(),
            MAX_TALLIED_PEERS + 1,
            "bounded, with one line for the rest"
        );
        let line = lines
            .iter()
            .find(|l| l.peer.as_deref() == Some("127.0.0.2"))
            .unwrap();
        let reason = line.reason.as_deref().unwrap();
        assert!(reason.starts_with("1001 connection(s)"), "{reason}");
        assert!(reason.contains("no_certificate=1000"), "{reason}");
        assert!(reason.contains("untrusted_certificate=1"), "{reason}");
        assert!(reason.ends_with("last: bad chain"), "{reason}");
        let rest = lines
            .iter()
            .find(|l| l.peer.as_deref() == Some("other peers"))
            .unwrap();
        assert!(
            rest.reason
                .as_deref()
                .unwrap()
                .starts_with("11 connection(s)")
        );
        assert!(
            t.drain(Duration::from_secs(60)).is_empty(),
            "a fresh interval"
        );
    }
}
