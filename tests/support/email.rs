//! A stand-in for a Resend-compatible email API (`POST /emails`, bearer key), for the flow
//! tests and the demo: it records what it accepts, can be told to fail the next requests, and
//! honours `Idempotency-Key` as Resend does (a key it accepted before is not sent again).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};

/// One email the API accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct SentEmail {
    pub from: String,
    pub to: Vec<String>,
    pub subject: String,
    pub html: String,
    pub idempotency_key: Option<String>,
}

/// A failure the stub answers with.
#[derive(Clone, Copy)]
struct Failure {
    status: u16,
    /// Accept (send) the email first, then answer `status` anyway: a lost reply.
    after_sending: bool,
}

#[derive(Default)]
struct Inbox {
    api_key: String,
    sent: Vec<SentEmail>,
    /// Statuses to answer the next requests with, before accepting again.
    failures: VecDeque<Failure>,
    requests: u64,
    /// The `Idempotency-Key` of every request with the right API key, in order.
    request_keys: Vec<Option<String>>,
    /// How long to wait before answering the next requests.
    delays: VecDeque<std::time::Duration>,
    keys: HashSet<String>,
    /// Print each accepted email on stdout as it is accepted.
    echo: bool,
}

/// A running stub; it stops when dropped.
pub struct EmailApi {
    pub addr: SocketAddr,
    inbox: Arc<Mutex<Inbox>>,
    task: tokio::task::JoinHandle<()>,
}

impl EmailApi {
    /// Serve on a free loopback port, accepting `api_key`.
    pub async fn start(api_key: &str) -> EmailApi {
        Self::start_on("127.0.0.1:0".parse().expect("an address"), api_key, false)
            .await
            .expect("bind the email API stub")
    }

    /// Serve on `addr`, accepting `api_key`; with `echo`, print a line per accepted email.
    pub async fn start_on(addr: SocketAddr, api_key: &str, echo: bool) -> std::io::Result<EmailApi> {
        let inbox = Arc::new(Mutex::new(Inbox { api_key: api_key.into(), echo, ..Inbox::default() }));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().route("/emails", post(receive)).with_state(inbox.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(EmailApi { addr, inbox, task })
    }

    /// What a plugin's `base_url` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `allowed_hosts` entry of this stub.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Answer the next requests with these statuses, in order, sending nothing.
    pub fn fail_next(&self, statuses: &[u16]) {
        let failures = statuses.iter().map(|&status| Failure { status, after_sending: false });
        self.inbox.lock().expect("inbox").failures.extend(failures);
    }

    /// Send the next emails, but answer them with these statuses, as if the reply was lost.
    pub fn fail_after_sending(&self, statuses: &[u16]) {
        let failures = statuses.iter().map(|&status| Failure { status, after_sending: true });
        self.inbox.lock().expect("inbox").failures.extend(failures);
    }

    /// Wait this long before answering the next requests, in order: a slow API.
    pub fn delay_next(&self, delays: &[std::time::Duration]) {
        self.inbox.lock().expect("inbox").delays.extend(delays);
    }

    /// The `Idempotency-Key` of every request that had the right API key, in order.
    pub fn request_keys(&self) -> Vec<Option<String>> {
        self.inbox.lock().expect("inbox").request_keys.clone()
    }

    pub fn sent(&self) -> Vec<SentEmail> {
        self.inbox.lock().expect("inbox").sent.clone()
    }

    /// Requests received, whatever the answer.
    pub fn requests(&self) -> u64 {
        self.inbox.lock().expect("inbox").requests
    }
}

impl Drop for EmailApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(inbox): State<Arc<Mutex<Inbox>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let delay = inbox.lock().expect("inbox").delays.pop_front();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut inbox = inbox.lock().expect("inbox");
    inbox.requests += 1;
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(inbox.api_key.as_str()) {
        return (StatusCode::UNAUTHORIZED, Json(json!({ "message": "API key is invalid" })));
    }
    let idempotency_key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
    inbox.request_keys.push(idempotency_key.clone());
    let failure = inbox.failures.pop_front();
    let answer = |status: StatusCode, body: Value| match failure {
        Some(f) => (
            StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(json!({ "message": "failing as told" })),
        ),
        None => (status, Json(body)),
    };
    if failure.is_some_and(|f| !f.after_sending) {
        return answer(StatusCode::OK, Value::Null);
    }
    if let Some(key) = &idempotency_key
        && !inbox.keys.insert(key.clone())
    {
        return answer(StatusCode::OK, json!({ "id": key }));
    }
    let text = |name: &str| body[name].as_str().unwrap_or_default().to_string();
    let to = match &body["to"] {
        Value::String(one) => vec![one.clone()],
        Value::Array(many) => many.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    if to.is_empty() || text("subject").is_empty() {
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "message": "`to` and `subject` are required" })));
    }
    let email = SentEmail { from: text("from"), to, subject: text("subject"), html: text("html"), idempotency_key };
    let id = format!("email-{}", inbox.sent.len() + 1);
    if inbox.echo {
        println!("{:<24} {}", email.to.join(","), email.subject);
    }
    inbox.sent.push(email);
    answer(StatusCode::OK, json!({ "id": id }))
}
