//! TLS on both legs, through OpenSSL, and the plain-or-TLS [`Stream`] every path forwards over.
//!
//! Device side (design decision 14): real devices offer only static-RSA and ECDHE-ECDSA suites
//! with CBC/CCM under TLS 1.2 and send no SNI, which rustls cannot serve; OpenSSL with an
//! explicit cipher list can. Upstream side: the add-on's certificate is self-signed and
//! regenerated per image, so verification is off by default, or pinned to a CA or a SHA-256
//! fingerprint.
//!
//! Invariants:
//! - No private key is shipped: when no certificate is configured, a fresh self-signed RSA
//!   certificate is generated in memory at start-up.
//! - Upstream connections never send SNI or check host names: the add-on has no stable name and
//!   devices never sent one either.
//! - An upstream session is only offered again on a connection of the context that made it
//!   ([`UpstreamTls`]); the crate's one `unsafe` block rests on this.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::ssl::{
    Ssl, SslAcceptor, SslConnector, SslFiletype, SslMethod, SslOptions, SslSession,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::x509::{X509NameBuilder, X509};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use crate::config::{DeviceTls, TlsVersion, UpstreamVerify};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
    #[error("loading {what} from {path}: {source}")]
    Load {
        what: &'static str,
        path: String,
        source: openssl::error::ErrorStack,
    },
    #[error("device cipher list {list:?} was rejected by OpenSSL: {source}")]
    Ciphers {
        list: String,
        source: openssl::error::ErrorStack,
    },
    #[error("TLS handshake: {0}")]
    Handshake(#[from] openssl::ssl::Error),
}

/// A freshly generated self-signed RSA certificate and its key.
pub struct SelfSigned {
    pub cert: X509,
    pub key: PKey<Private>,
}

/// Generates a throw-away self-signed RSA certificate (2048-bit, SHA-256, 10 years), the same
/// shape as the add-on's own, so devices accept it.
pub fn self_signed(common_name: &str) -> Result<SelfSigned, TlsError> {
    let key = PKey::from_rsa(Rsa::generate(2048)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", common_name)?;
    let name = name.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(64, MsbOption::MAYBE_ZERO, false)?;
    b.set_serial_number(serial.to_asn1_integer()?.as_ref())?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(&key)?;
    b.set_not_before(Asn1Time::days_from_now(0)?.as_ref())?;
    b.set_not_after(Asn1Time::days_from_now(3650)?.as_ref())?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok(SelfSigned {
        cert: b.build(),
        key,
    })
}

fn version(v: TlsVersion) -> SslVersion {
    match v {
        TlsVersion::Tls10 => SslVersion::TLS1,
        TlsVersion::Tls11 => SslVersion::TLS1_1,
        TlsVersion::Tls12 => SslVersion::TLS1_2,
        TlsVersion::Tls13 => SslVersion::TLS1_3,
    }
}

/// Builds the device-facing acceptor from configuration. Returns the acceptor and, when a
/// certificate was generated, that certificate (for logs and tests).
pub fn device_acceptor(cfg: &DeviceTls) -> Result<(SslAcceptor, Option<X509>), TlsError> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    buffer_modes(&mut b);
    // Devices and the add-on often just drop TCP; that is a close, not an error.
    b.set_options(SslOptions::IGNORE_UNEXPECTED_EOF);
    // The Mozilla profile disables TLS 1.0/1.1 by option, which would override `min_version`.
    // (OpenSSL 3 still needs "@SECLEVEL=0" in the cipher list to complete a 1.0/1.1 handshake.)
    b.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
    b.set_min_proto_version(Some(version(cfg.min_version)))?;
    b.set_max_proto_version(Some(version(cfg.max_version)))?;
    b.set_cipher_list(&cfg.ciphers)
        .map_err(|source| TlsError::Ciphers {
            list: cfg.ciphers.clone(),
            source,
        })?;
    let generated = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            b.set_certificate_chain_file(cert)
                .map_err(|source| load_err("certificate", cert, source))?;
            b.set_private_key_file(key, SslFiletype::PEM)
                .map_err(|source| load_err("private key", key, source))?;
            b.check_private_key()?;
            None
        }
        _ => {
            let s = self_signed("cync-gateway")?;
            b.set_certificate(&s.cert)?;
            b.set_private_key(&s.key)?;
            Some(s.cert)
        }
    };
    Ok((b.build(), generated))
}

fn load_err(what: &'static str, path: &Path, source: openssl::error::ErrorStack) -> TlsError {
    TlsError::Load {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// The client side toward one upstream: its connector, and the newest session that upstream
/// gave it, offered again on the next handshake (as HAProxy does toward its servers by
/// default). A resumed handshake skips the certificate and the server's signature: for an
/// add-on on a small host, a fleet reconnecting at once costs it one RSA signature per device
/// less (docs/benchmarks.md, time to the first answer).
///
/// Invariant: `last` only ever holds sessions of `connector`'s own context (the callback that
/// fills it is set on that context and the two are built together and never separated), which
/// is what `SSL_set_session` requires. A server that does not know the session (restarted,
/// re-keyed, another certificate) answers with a full handshake, verified as configured.
/// OpenSSL itself stops offering a session whose connection was freed without a close_notify
/// sent (it may have ended in an attack); the next connection's ticket replaces it.
pub struct UpstreamTls {
    connector: SslConnector,
    last: Option<Arc<Mutex<Option<SslSession>>>>,
}

impl UpstreamTls {
    /// Builds the connector for one verification policy; `reuse` offers the last session again.
    pub fn new(verify: &UpstreamVerify, reuse: bool) -> Result<UpstreamTls, TlsError> {
        let mut b = SslConnector::builder(SslMethod::tls_client())?;
        buffer_modes(&mut b);
        b.set_options(SslOptions::IGNORE_UNEXPECTED_EOF);
        match verify {
            UpstreamVerify::None => b.set_verify(SslVerifyMode::NONE),
            UpstreamVerify::Ca(path) => {
                b.set_ca_file(path)
                    .map_err(|source| load_err("CA file", path, source))?;
                b.set_verify(SslVerifyMode::PEER);
            }
            UpstreamVerify::Fingerprint(fp) => {
                let fp = *fp;
                b.set_verify_callback(SslVerifyMode::PEER, move |_preverified, ctx| {
                    // Only the leaf is pinned; chain errors (self-signed) are irrelevant when
                    // the exact certificate is known.
                    if ctx.error_depth() != 0 {
                        return true;
                    }
                    ctx.current_cert()
                        .and_then(|c| c.digest(MessageDigest::sha256()).ok())
                        .is_some_and(|d| d.as_ref() == fp)
                });
            }
        }
        let last = reuse.then(|| {
            let last: Arc<Mutex<Option<SslSession>>> = Arc::default();
            let fill = last.clone();
            // Only the newest is kept: under TLS 1.3 every connection brings a fresh ticket,
            // and one per upstream is all a fleet of identical connections needs.
            b.set_session_cache_mode(SslSessionCacheMode::CLIENT);
            b.set_new_session_callback(move |_, session| {
                *fill.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
            });
            last
        });
        Ok(UpstreamTls {
            connector: b.build(),
            last,
        })
    }

    /// Runs the client side of a TLS handshake, without SNI or host-name check, offering the
    /// last session when there is one.
    pub async fn connect(&self, tcp: TcpStream) -> Result<Stream, TlsError> {
        let mut ssl = self
            .connector
            .configure()?
            .use_server_name_indication(false)
            .verify_hostname(false)
            .into_ssl("")?;
        let offer = self
            .last
            .as_ref()
            .and_then(|l| l.lock().unwrap_or_else(|p| p.into_inner()).clone());
        if let Some(session) = offer {
            offer_session(&mut ssl, &session)?;
        }
        let mut s = SslStream::new(ssl, tcp)?;
        Pin::new(&mut s).connect().await?;
        Ok(Stream::tls(s))
    }
}

/// The one `unsafe` in the crate: `SSL_set_session` is sound only with a session of the same
/// context, which [`UpstreamTls`]'s invariant guarantees (its sessions come from its own
/// connector's callback).
#[allow(unsafe_code)]
fn offer_session(ssl: &mut Ssl, session: &SslSession) -> Result<(), TlsError> {
    // SAFETY: `session` was handed to the new-session callback of the context `ssl` was made
    // from (UpstreamTls keeps both together).
    unsafe { ssl.set_session(session) }?;
    Ok(())
}

/// OpenSSL frees a connection's read and write buffers (about 34 KiB each) whenever they are
/// empty, as HAProxy has it do: an idle device connection then holds none, which is most of
/// what a TLS connection costs (docs/benchmarks.md, idle memory per device).
///
/// And it reads ahead: one `recv` takes all the socket holds, where by default OpenSSL reads a
/// record's 5-byte header, then its body, then tries once more and finds nothing: three
/// syscalls for every frame forwarded, against one for plaintext. Records read ahead are in
/// OpenSSL's buffer, not the socket's, which [`Stream::poll_read_ready`] accounts for.
fn buffer_modes(b: &mut openssl::ssl::SslContextBuilder) {
    b.set_mode(openssl::ssl::SslMode::RELEASE_BUFFERS);
    b.set_read_ahead(true);
}

/// Runs the server side of a TLS handshake on an accepted socket.
pub async fn accept(acceptor: &SslAcceptor, tcp: TcpStream) -> Result<Stream, TlsError> {
    let ssl = Ssl::new(acceptor.context())?;
    let mut s = SslStream::new(ssl, tcp)?;
    Pin::new(&mut s).accept().await?;
    Ok(Stream::tls(s))
}

/// A connection to a peer, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

/// A TLS connection and whether OpenSSL may hold bytes the socket no longer shows.
pub struct TlsConn {
    s: SslStream<TcpStream>,
    /// The last read brought data: OpenSSL may hold more records it read ahead, while the
    /// socket, drained by that one `recv`, is no longer readable. Lowered by a read that
    /// found nothing (OpenSSL's buffer empty, the socket's waker registered).
    more: bool,
}

impl Stream {
    /// A TLS connection whose handshake is done.
    pub fn tls(s: SslStream<TcpStream>) -> Stream {
        Stream::Tls(Box::new(TlsConn { s, more: false }))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(t) => t,
            Stream::Tls(c) => c.s.get_ref(),
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    /// Makes the next close an RST instead of a FIN, so a reset seen on one leg reaches the
    /// other as a reset.
    pub fn set_reset_on_close(&self) {
        // Failure only means the close will be a FIN; nothing else to do about it.
        let _ = socket2::SockRef::from(self.tcp()).set_linger(Some(std::time::Duration::ZERO));
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The negotiated cipher, for logs and tests.
    pub fn cipher_name(&self) -> Option<&'static str> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(c) => c.s.ssl().current_cipher().map(|c| c.name()),
        }
    }

    /// Whether the TLS handshake resumed an earlier session (false for plaintext).
    pub fn session_reused(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(c) => c.s.ssl().session_reused(),
        }
    }
}

impl Stream {
    /// Ready when a read would not wait: bytes (or EOF, or an error) on the socket, or
    /// bytes OpenSSL may already hold (decrypted, or records read ahead: until a read has
    /// come back empty, the next one is tried rather than the socket waited on). Needs no
    /// buffer, so a connection waiting for its peer holds none.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(t) => t.poll_read_ready(cx),
            Stream::Tls(c) if c.more || c.s.ssl().pending() > 0 => Poll::Ready(Ok(())),
            Stream::Tls(c) => c.s.get_ref().poll_read_ready(cx),
        }
    }

    /// The two directions apart, for a task that reads one while writing the other. Both
    /// halves are meant to be polled by one task (as the paths do): the lock between them is
    /// then never contended.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        let shared = std::sync::Arc::new(std::sync::Mutex::new(self));
        (ReadHalf(shared.clone()), WriteHalf(shared))
    }
}

type Shared = std::sync::Arc<std::sync::Mutex<Stream>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Stream> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The most [`ReadHalf::read_ready`] reads at once: more than any Cync frame, than the
/// add-on's 2,048-byte reads and than a TLS record's plaintext.
pub const READ_SCRATCH: usize = 16 * 1024;

/// The reading half of a [`Stream`].
pub struct ReadHalf(Shared);

/// The writing half of a [`Stream`].
pub struct WriteHalf(Shared);

impl ReadHalf {
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.0).poll_read_ready(cx)
    }

    /// Waits for bytes without a buffer, then reads at most `limit` of them (at most
    /// [`READ_SCRATCH`]) and returns them in a buffer of their own size: a connection waiting
    /// for its peer (most of them, most of the time) holds no read buffer. Empty means EOF.
    /// Cancel-safe: its only wait is the readiness, before anything is read.
    ///
    /// The read lands on the stack and only what came is copied out, rather than a buffer of
    /// `limit` allocated on the heap and freed again for every frame forwarded (a size glibc
    /// serves from its bins, not its per-thread cache). Measured: no change in idle RSS, nor
    /// in user CPU at 200 commands/s.
    pub async fn read_ready(&mut self, limit: usize) -> io::Result<bytes::BytesMut> {
        loop {
            std::future::poll_fn(|cx| self.poll_read_ready(cx)).await?;
            // One attempt, never waiting: `None` when the readiness was stale (a TLS record
            // not yet whole, say); the socket's waker is registered and the wait starts over.
            let read = std::future::poll_fn(|cx| {
                let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_SCRATCH];
                let mut dst = ReadBuf::uninit(&mut scratch[..limit.min(READ_SCRATCH)]);
                match Pin::new(&mut *self).poll_read(cx, &mut dst) {
                    Poll::Pending => Poll::Ready(None),
                    Poll::Ready(r) => {
                        Poll::Ready(Some(r.map(|()| bytes::BytesMut::from(dst.filled()))))
                    }
                }
            })
            .await;
            match read {
                None => continue,
                Some(r) => return r,
            }
        }
    }

    /// [`Stream::set_reset_on_close`] of the whole stream.
    pub fn set_reset_on_close(&self) {
        lock(&self.0).set_reset_on_close();
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(&self.0)).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *lock(&self.0)).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(&self.0)).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(&self.0)).poll_shutdown(cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Stream::Tls(c) => {
                let before = buf.filled().len();
                let r = Pin::new(&mut c.s).poll_read(cx, buf);
                c.more = matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before;
                r
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(t) => Pin::new(t).poll_write(cx, buf),
            Stream::Tls(c) => Pin::new(&mut c.s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(t) => Pin::new(t).poll_flush(cx),
            Stream::Tls(c) => Pin::new(&mut c.s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Stream::Tls(c) => Pin::new(&mut c.s).poll_shutdown(cx),
        }
    }
}
