//! The rollback webhook: POST a JSON event (a rollback, a verdict) to an operator's endpoint,
//! off the controller's path.
//!
//! It owns the target ([`Webhook`]: an `http://` URL and an optional bearer token), one
//! bounded exchange ([`Webhook::post_once`]), delivery with retries ([`Webhook::deliver`]) and
//! the queue the controller hands events to ([`Notifier`]).
//!
//! Invariants:
//! - Never on the controller's path: the controller calls [`Notifier::notify`], which only
//!   `try_send`s onto a bounded queue and returns at once; a full queue drops the event (and
//!   says so), it never waits. A dead or slow webhook therefore never delays a rollback.
//! - Every exchange is bounded by its timeout (connect, request and response together), and
//!   the connection task of an exchange is aborted when the exchange ends, so a peer that
//!   never answers holds no task or socket beyond it.
//! - Events are delivered in the order they were queued, one at a time.
//! - The token is sent only in the `Authorization` header and never printed (`Debug` hides it).
//!
//! Known gap: only `http://` URLs are supported; `https://` is rejected at construction until
//! the client gets TLS.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// Why a webhook could not be built or an exchange failed.
#[derive(Debug, Error)]
pub enum WebhookError {
    /// The URL is not an `http://host[:port][/path]` URL.
    #[error("bad webhook URL: {0}")]
    BadUrl(String),
    /// The token cannot be sent in an HTTP header.
    #[error("bad webhook token: it must be visible ASCII, without control characters")]
    BadToken,
    /// The TCP connection could not be made.
    #[error("webhook connect failed: {0}")]
    Connect(#[source] std::io::Error),
    /// The exchange did not finish within its timeout.
    #[error("webhook timed out")]
    Timeout,
    /// An HTTP-level failure: handshake, request or response.
    #[error("webhook HTTP error: {0}")]
    Http(String),
    /// The endpoint answered with a non-2xx status.
    #[error("webhook answered HTTP {0}")]
    Status(u16),
}

/// A webhook target: an `http://` URL and an optional bearer token.
#[derive(Clone)]
pub struct Webhook {
    url: Uri,
    token: Option<String>,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The value of the `User-Agent` header.
const AGENT: &str = concat!("cync-gateway/", env!("CARGO_PKG_VERSION"));

impl Webhook {
    /// A webhook posting to `url` (`http://host[:port][/path]`), with `Authorization: Bearer
    /// <token>` when a token is given. Rejects other schemes (https is not supported yet),
    /// URLs without a host, and tokens that cannot be sent in a header.
    pub fn new(url: &str, token: Option<String>) -> Result<Webhook, WebhookError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| WebhookError::BadUrl(format!("{url:?}: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(WebhookError::BadUrl(format!(
                    "{url:?}: https is not supported yet, use http://"
                )))
            }
            Some(other) => {
                return Err(WebhookError::BadUrl(format!(
                    "{url:?}: scheme {other:?} is not supported, use http://"
                )))
            }
            None => {
                return Err(WebhookError::BadUrl(format!(
                    "{url:?}: not an absolute URL, expected http://host[:port]/path"
                )))
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(WebhookError::BadUrl(format!("{url:?}: no host")));
        }
        if let Some(t) = &token {
            bearer(t)?;
        }
        Ok(Webhook { url: uri, token })
    }

    /// The URL posted to.
    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// POST `body` once; the HTTP status on a 2xx answer. The whole exchange (connect, send,
    /// response head) is bounded by `timeout`; a non-2xx answer is [`WebhookError::Status`].
    pub async fn post_once(
        &self,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<u16, WebhookError> {
        match tokio::time::timeout(timeout, self.exchange(body)).await {
            Ok(r) => r,
            Err(_) => Err(WebhookError::Timeout),
        }
    }

    async fn exchange(&self, body: &serde_json::Value) -> Result<u16, WebhookError> {
        let http = |e: hyper::Error| WebhookError::Http(e.to_string());
        let host = self.url.host().unwrap_or_default();
        // `Uri` keeps IPv6 brackets in `host()`; the socket address wants them off.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self.url.port_u16().unwrap_or(80);
        let authority = self
            .url
            .authority()
            .map(|a| a.as_str())
            .unwrap_or(host)
            .to_string();
        let path = self
            .url
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/");

        let payload =
            serde_json::to_vec(body).map_err(|e| WebhookError::Http(format!("body: {e}")))?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(HOST, authority)
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, AGENT);
        if let Some(t) = &self.token {
            req = req.header(AUTHORIZATION, bearer(t)?);
        }
        let req = req
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| WebhookError::Http(e.to_string()))?;

        let stream = TcpStream::connect((host, port))
            .await
            .map_err(WebhookError::Connect)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // The connection runs beside the request; aborted when this exchange ends, however it
        // ends (answer, error or timeout), so it cannot outlive the exchange.
        let _conn = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "webhook connection ended with an error");
            }
        }));
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        if status.is_success() {
            Ok(status.as_u16())
        } else {
            Err(WebhookError::Status(status.as_u16()))
        }
    }

    /// POST `body` up to `attempts` times (at least once), each bounded by `timeout`, sleeping
    /// `backoff`, then twice that, four times … between attempts.
    pub async fn deliver(
        &self,
        body: serde_json::Value,
        attempts: u32,
        timeout: Duration,
        backoff: Duration,
    ) -> Delivery {
        let attempts = attempts.max(1);
        let mut attempt = 1;
        loop {
            match self.post_once(&body, timeout).await {
                Ok(_) => return Delivery::Delivered { attempts: attempt },
                Err(e) if attempt >= attempts => {
                    return Delivery::Failed {
                        attempts: attempt,
                        last_error: e.to_string(),
                    }
                }
                Err(e) => {
                    debug!(attempt, error = %e, url = %self.url, "webhook attempt failed, retrying");
                    tokio::time::sleep(retry_delay(backoff, attempt)).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// `Bearer <token>` as a sensitive header value.
fn bearer(token: &str) -> Result<HeaderValue, WebhookError> {
    let mut v =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| WebhookError::BadToken)?;
    v.set_sensitive(true);
    Ok(v)
}

/// The sleep after failed attempt `attempt` (1-based): `backoff × 2^(attempt − 1)`, saturating.
fn retry_delay(backoff: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    backoff.saturating_mul(factor)
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How one event's delivery ended; the label (`delivered` | `failed`) is for a metric.
#[derive(Debug, Clone, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum Delivery {
    /// A 2xx answer, after this many attempts.
    Delivered {
        /// Attempts made, the successful one included.
        attempts: u32,
    },
    /// Every attempt failed.
    Failed {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last_error: String,
    },
}

/// The controller's handle on the webhook: queue an event and return at once.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::Sender<serde_json::Value>,
}

impl Notifier {
    /// Start the delivery task for `webhook`: it delivers each queued body in order with
    /// [`Webhook::deliver`] (`attempts`, `timeout`, `backoff`) and calls `on_result` with each
    /// outcome. At most `cap` bodies wait (at least 1). The task ends when every [`Notifier`]
    /// clone is dropped and the queue is drained.
    pub fn spawn(
        webhook: Webhook,
        cap: usize,
        attempts: u32,
        timeout: Duration,
        backoff: Duration,
        on_result: impl Fn(&Delivery) + Send + 'static,
    ) -> (Notifier, JoinHandle<()>) {
        let (n, worker) = Notifier::new(webhook, cap, attempts, timeout, backoff, on_result);
        (n, tokio::spawn(worker))
    }

    /// As [`Notifier::spawn`], but hands back the delivery task's future for the caller to
    /// run on its own tracker (the gateway's named tasks).
    pub fn new(
        webhook: Webhook,
        cap: usize,
        attempts: u32,
        timeout: Duration,
        backoff: Duration,
        on_result: impl Fn(&Delivery) + Send + 'static,
    ) -> (
        Notifier,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(cap.max(1));
        let worker = async move {
            while let Some(body) = rx.recv().await {
                let d = webhook.deliver(body, attempts, timeout, backoff).await;
                if let Delivery::Failed {
                    attempts,
                    last_error,
                } = &d
                {
                    warn!(url = %webhook.url, attempts, error = %last_error, "webhook event not delivered");
                }
                on_result(&d);
            }
        };
        (Notifier { tx }, worker)
    }

    /// Queue `body` for delivery without waiting: `false` (and the event dropped) when the
    /// queue is full or the delivery task is gone.
    pub fn notify(&self, body: serde_json::Value) -> bool {
        match self.tx.try_send(body) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!("webhook queue full, event dropped");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                warn!("webhook task gone, event dropped");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{HeaderMap, Response, StatusCode};
    use serde_json::json;
    use tokio::net::TcpListener;
    use tokio::time::Instant;

    use super::*;

    /// A deadline for anything a test awaits from a real socket.
    const DEADLINE: Duration = Duration::from_secs(5);

    /// What the test server saw of one request.
    #[derive(Debug)]
    struct Seen {
        method: Method,
        path: String,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    /// An HTTP server on a free loopback port answering with `statuses` in turn (the last one
    /// repeats), recording every request on the returned channel.
    async fn server(statuses: Vec<u16>) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let statuses = Arc::new(Mutex::new(VecDeque::from(statuses)));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let statuses = statuses.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    let statuses = statuses.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes().to_vec();
                        let code = {
                            let mut q = statuses.lock().unwrap();
                            if q.len() > 1 {
                                q.pop_front().unwrap()
                            } else {
                                *q.front().unwrap()
                            }
                        };
                        let _ = tx.send(Seen {
                            method: parts.method,
                            path: parts.uri.to_string(),
                            headers: parts.headers,
                            body,
                        });
                        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                        *r.status_mut() = StatusCode::from_u16(code).unwrap();
                        Ok::<_, Infallible>(r)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
            }
        });
        (addr, rx)
    }

    /// A server that accepts connections and never answers; reports each accept.
    async fn silent_server() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
                let _ = tx.send(());
            }
        });
        (addr, rx)
    }

    /// A loopback port nothing listens on: bind one, then close it.
    /// A port nothing answers on, kept reserved while the socket lives (bound, never
    /// listening): a dropped listener's port could be handed to another test meanwhile.
    fn closed_port() -> (socket2::Socket, SocketAddr) {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let addr = s.local_addr().unwrap().as_socket().unwrap();
        (s, addr)
    }

    async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("nothing within the deadline")
            .expect("server gone")
    }

    #[tokio::test]
    async fn post_with_token_sends_headers_and_body() {
        let (addr, mut seen) = server(vec![204]).await;
        let hook = Webhook::new(
            &format!("http://{addr}/hooks/rollback?src=gw"),
            Some("t0k".into()),
        )
        .unwrap();
        let body = json!({"event": "rollback", "reason": "success 97.00% < floor 99.50%", "n": 3});
        let status = hook.post_once(&body, DEADLINE).await.unwrap();
        assert_eq!(status, 204);

        let req = next(&mut seen).await;
        assert_eq!(req.method, Method::POST);
        assert_eq!(req.path, "/hooks/rollback?src=gw");
        let h = |name| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        assert_eq!(h("authorization"), "Bearer t0k");
        assert_eq!(h("content-type"), "application/json");
        assert_eq!(h("host"), addr.to_string());
        assert_eq!(
            h("user-agent"),
            format!("cync-gateway/{}", env!("CARGO_PKG_VERSION"))
        );
        let got: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(got, body);
    }

    #[tokio::test]
    async fn post_without_token_sends_no_authorization() {
        let (addr, mut seen) = server(vec![200]).await;
        let hook = Webhook::new(&format!("http://{addr}"), None).unwrap();
        assert_eq!(hook.post_once(&json!({}), DEADLINE).await.unwrap(), 200);
        let req = next(&mut seen).await;
        assert_eq!(req.path, "/");
        assert!(req.headers.get("authorization").is_none());
    }

    #[tokio::test]
    async fn non_2xx_is_a_status_error() {
        let (addr, _seen) = server(vec![404]).await;
        let hook = Webhook::new(&format!("http://{addr}/x"), None).unwrap();
        let e = hook.post_once(&json!({}), DEADLINE).await.unwrap_err();
        assert!(matches!(e, WebhookError::Status(404)), "{e:?}");
    }

    #[tokio::test]
    async fn retries_until_delivered() {
        let (addr, mut seen) = server(vec![500, 500, 200]).await;
        let hook = Webhook::new(&format!("http://{addr}/h"), None).unwrap();
        let d = hook
            .deliver(json!({"k": 1}), 5, DEADLINE, Duration::from_millis(1))
            .await;
        assert_eq!(d, Delivery::Delivered { attempts: 3 });
        for _ in 0..3 {
            assert_eq!(next(&mut seen).await.body, br#"{"k":1}"#);
        }
        assert!(seen.try_recv().is_err(), "a fourth request after success");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_within_the_timeout() {
        let (addr, mut accepted) = silent_server().await;
        let hook = Webhook::new(&format!("http://{addr}/"), None).unwrap();
        let timeout = Duration::from_millis(200);
        let start = Instant::now();
        let e = hook.post_once(&json!({}), timeout).await.unwrap_err();
        let took = start.elapsed();
        assert!(matches!(e, WebhookError::Timeout), "{e:?}");
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(2),
            "{took:?}"
        );
        next(&mut accepted).await; // it did connect: the time went waiting for an answer
    }

    #[tokio::test]
    async fn a_closed_port_fails_after_every_attempt() {
        let (_reserved, addr) = closed_port();
        let hook = Webhook::new(&format!("http://{addr}/"), None).unwrap();
        let e = hook.post_once(&json!({}), DEADLINE).await.unwrap_err();
        assert!(matches!(e, WebhookError::Connect(_)), "{e:?}");
        let d = hook
            .deliver(json!({}), 3, DEADLINE, Duration::from_millis(1))
            .await;
        match &d {
            Delivery::Failed {
                attempts,
                last_error,
            } => {
                assert_eq!(*attempts, 3);
                assert!(last_error.contains("connect"), "{last_error}");
            }
            other => panic!("{other:?}"),
        }
        let label: &'static str = (&d).into();
        assert_eq!(label, "failed");
    }

    #[test]
    fn delivery_labels() {
        let l: &'static str = (&Delivery::Delivered { attempts: 1 }).into();
        assert_eq!(l, "delivered");
    }

    #[test]
    fn rejects_bad_urls_and_tokens() {
        for url in [
            "https://x",
            "https://hooks.example.com/rollback",
            "ftp://x/y",
            "not a url",
            "/just/a/path",
            "http://",
            "",
        ] {
            match Webhook::new(url, None) {
                Err(WebhookError::BadUrl(msg)) => {
                    assert!(msg.contains(&format!("{url:?}")), "{url}: {msg}")
                }
                other => panic!("{url:?} accepted: {other:?}"),
            }
        }
        let https = Webhook::new("https://x", None).unwrap_err().to_string();
        assert!(https.contains("https is not supported"), "{https}");
        assert!(matches!(
            Webhook::new("http://x/", Some("a\nb".into())),
            Err(WebhookError::BadToken)
        ));
        let ok = Webhook::new("http://127.0.0.1:9/h", Some("secret".into())).unwrap();
        assert!(!format!("{ok:?}").contains("secret"));
    }

    #[test]
    fn backoff_doubles() {
        let b = Duration::from_millis(100);
        let got: Vec<_> = (1..=4).map(|a| retry_delay(b, a).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800]);
        assert_eq!(retry_delay(b, 100), b.saturating_mul(u32::MAX));
    }

    #[tokio::test]
    async fn notify_returns_false_when_the_queue_is_full() {
        // No delivery task: the queue only fills.
        let (tx, mut rx) = mpsc::channel(2);
        let n = Notifier { tx };
        assert!(n.notify(json!(1)));
        assert!(n.notify(json!(2)));
        assert!(!n.notify(json!(3)));
        assert_eq!(rx.recv().await, Some(json!(1)));
        assert!(n.notify(json!(4)));
        drop(rx);
        assert!(
            !n.notify(json!(5)),
            "a gone task is not an error, just false"
        );
    }

    #[tokio::test]
    async fn notify_never_waits_on_a_dead_webhook() {
        // The task is stuck on the first event (the server never answers); with a queue of 1,
        // at most two events fit, so the third notify must refuse, and none of them wait.
        let (addr, _accepted) = silent_server().await;
        let hook = Webhook::new(&format!("http://{addr}/"), None).unwrap();
        let (n, task) = Notifier::spawn(hook, 1, 3, DEADLINE, DEADLINE, |_| {});
        let start = Instant::now();
        let accepted: Vec<bool> = (0..3).map(|i| n.notify(json!(i))).collect();
        assert!(start.elapsed() < Duration::from_millis(100));
        assert!(accepted.contains(&false), "{accepted:?}");
        task.abort();
    }

    #[tokio::test]
    async fn notifier_delivers_in_order_and_reports() {
        let (addr, mut seen) = server(vec![200]).await;
        let hook = Webhook::new(&format!("http://{addr}/"), None).unwrap();
        let (done_tx, mut done) = mpsc::unbounded_channel();
        let (n, task) = Notifier::spawn(hook, 8, 2, DEADLINE, Duration::from_millis(1), move |d| {
            let _ = done_tx.send(d.clone());
        });
        for i in 0..3 {
            assert!(n.notify(json!({ "seq": i })));
        }
        for i in 0..3 {
            let body: serde_json::Value =
                serde_json::from_slice(&next(&mut seen).await.body).unwrap();
            assert_eq!(body, json!({ "seq": i }));
            assert_eq!(next(&mut done).await, Delivery::Delivered { attempts: 1 });
        }
        drop(n);
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    }
}
