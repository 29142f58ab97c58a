//! The dead-letter console: a JSON API and a small page over the `idem dlq`
//! operations, served by `idem dlq serve` or mounted by a service ([`router`]).
//!
//! | method and path | what |
//! |---|---|
//! | `GET /` | the page (HTML, JS and CSS shipped in the crate; no build step, nothing fetched from elsewhere) |
//! | `GET /api/queues` | the configured queues: name, DLQ, depth |
//! | `GET /api/queues/{q}/groups` | `stats` of the DLQ of `q` |
//! | `GET /api/queues/{q}/messages?group=&id=&match=&limit=&max_bytes=` | `show` of the selected messages (default 50, bodies cut at 4 KiB) |
//! | `POST /api/queues/{q}/replay` | body `{"ids": [..]}` or `{"group": ".."}` or `{"all": true}`, optional `"rate"` (per second), `"dry_run"` |
//! | `POST /api/queues/{q}/purge` | body `{"ids": [..]}` or `{"group": ".."}`, optional `"dry_run"` |
//! | `POST /api/queues/{q}/edit` | body `{"id": "..", "json_set": ["/cents=500"]}` or `{"id": "..", "body_base64": ".."}` |
//!
//! `idem dlq serve` without `--queue` finds the queues to serve through the RabbitMQ
//! management API ([`discover`]).
//!
//! Reads never change a queue (see [`crate::dlq`]). Writes are refused with 403
//! unless the console was started with writes allowed; then each needs the header
//! `Authorization: Bearer <token>` (401 without it, 403 with another token; tokens are
//! compared in constant time). Only the configured queues are reachable (404 for any
//! other name). Nothing the API returns contains the broker URL or a password. The page
//! puts every message text into the document as text (`textContent`), never as HTML.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lapin::Connection;
use serde::Deserialize;
use serde_json::json;

use crate::dlq::{self, Filter, ReplayOptions, Selector};
use crate::error::CliError;

pub mod discover;

const PAGE: &str = include_str!("console.html");
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// What the console serves.
#[derive(Clone, Debug)]
pub struct ConsoleConfig {
    /// The work queues shown (each named as for the other `dlq` commands).
    pub queues: Vec<String>,
    /// `Some(token)`: writes allowed with this bearer token; `None`: read-only.
    pub write_token: Option<String>,
}

struct Shared {
    conn: Connection,
    config: ConsoleConfig,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("queues", &self.config.queues)
            .field("writes", &self.config.write_token.is_some())
            .finish()
    }
}

type AppState = Arc<Shared>;

/// The console's router (page and API) over `conn`, for `axum::serve` or to nest in a
/// service's own router.
pub fn router(conn: Connection, config: ConsoleConfig) -> Router {
    let state = Arc::new(Shared { conn, config });
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/console.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    SCRIPT,
                )
            }),
        )
        .route(
            "/console.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }),
        )
        .route("/api/queues", get(queues))
        .route("/api/queues/{q}/groups", get(groups))
        .route("/api/queues/{q}/messages", get(messages))
        .route("/api/queues/{q}/replay", post(replay))
        .route("/api/queues/{q}/purge", post(purge))
        .route("/api/queues/{q}/edit", post(edit))
        .with_state(state)
}

/// An API error: a status and a JSON `{"error": ".."}` body.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<CliError> for ApiError {
    fn from(e: CliError) -> Self {
        let status = match &e {
            CliError::Usage(_) => StatusCode::BAD_REQUEST,
            CliError::NotFound(_) => StatusCode::NOT_FOUND,
            CliError::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError(status, e.to_string())
    }
}

fn known(s: &Shared, q: &str) -> Result<(), ApiError> {
    if s.config.queues.iter().any(|c| c == q) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("queue {q:?} is not served by this console"),
        ))
    }
}

/// Constant-time comparison of two tokens.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(s: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &s.config.write_token else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "this console is read-only (start it with --allow-writes)".to_owned(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "writes need the header Authorization: Bearer <IDEM_DLQ_TOKEN>".to_owned(),
        )),
        Some(g) if same(g.trim().as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError(StatusCode::FORBIDDEN, "wrong token".to_owned())),
    }
}

async fn queues(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let mut out = Vec::new();
    for q in &s.config.queues {
        let r = dlq::resolve(&s.conn, q).await;
        out.push(match r {
            Ok(r) => json!({ "queue": q, "dlq": r.dlq, "depth": r.counts.messages }),
            Err(e) => json!({ "queue": q, "error": e.to_string() }),
        });
    }
    Ok(Json(
        json!({ "queues": out, "writes": s.config.write_token.is_some() }),
    ))
}

async fn groups(State(s): State<AppState>, Path(q): Path<String>) -> Result<Response, ApiError> {
    known(&s, &q)?;
    Ok(Json(dlq::stats(&s.conn, &q, None).await?).into_response())
}

/// Message filters of the API (a subset of the CLI's).
#[derive(Debug, Default, Deserialize)]
struct MessageQuery {
    group: Option<String>,
    id: Option<String>,
    #[serde(rename = "match")]
    pattern: Option<String>,
    limit: Option<u64>,
    max_bytes: Option<usize>,
}

fn selector(
    ids: Vec<String>,
    group: Option<String>,
    pattern: Option<&str>,
    all: bool,
) -> Result<Selector, ApiError> {
    let f = Filter {
        ids: ids.into_iter().collect(),
        group,
        pattern: pattern.map(|p| dlq::pattern("match", p)).transpose()?,
        ..Filter::default()
    };
    Ok(if f.is_empty() {
        if all {
            Selector::All
        } else {
            Selector::Filter(Box::new(f))
        }
    } else {
        Selector::Filter(Box::new(f))
    })
}

async fn messages(
    State(s): State<AppState>,
    Path(q): Path<String>,
    Query(m): Query<MessageQuery>,
) -> Result<Response, ApiError> {
    known(&s, &q)?;
    let sel = selector(
        m.id.into_iter().collect(),
        m.group,
        m.pattern.as_deref(),
        true,
    )?;
    let shown = dlq::show(
        &s.conn,
        &q,
        &sel,
        m.max_bytes.unwrap_or(4096),
        m.limit.unwrap_or(50),
    )
    .await?;
    Ok(Json(shown).into_response())
}

/// A replay or purge request.
#[derive(Debug, Default, Deserialize)]
struct MoveRequest {
    #[serde(default)]
    ids: Vec<String>,
    group: Option<String>,
    #[serde(default)]
    all: bool,
    rate: Option<f64>,
    #[serde(default)]
    dry_run: bool,
}

fn move_selector(r: MoveRequest) -> Result<Selector, ApiError> {
    if r.ids.is_empty() && r.group.is_none() && !r.all {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "give ids, a group, or all: true".to_owned(),
        ));
    }
    selector(r.ids, r.group, None, r.all)
}

/// A write to a served queue: the queue of the path and the JSON body, extracted in
/// that order, then the request authorised (401/403) and the queue checked (404).
struct WriteRequest<T> {
    s: AppState,
    q: String,
    body: T,
}

impl<T: serde::de::DeserializeOwned> FromRequest<AppState> for WriteRequest<T> {
    type Rejection = Response;

    async fn from_request(req: Request, s: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let Path(q) = Path::<String>::from_request_parts(&mut parts, s)
            .await
            .map_err(IntoResponse::into_response)?;
        let headers = parts.headers.clone();
        let Json(body) = Json::<T>::from_request(Request::from_parts(parts, body), s)
            .await
            .map_err(IntoResponse::into_response)?;
        authorize(s, &headers).map_err(IntoResponse::into_response)?;
        known(s, &q).map_err(IntoResponse::into_response)?;
        Ok(WriteRequest {
            s: s.clone(),
            q,
            body,
        })
    }
}

async fn replay(
    WriteRequest { s, q, body: r }: WriteRequest<MoveRequest>,
) -> Result<Response, ApiError> {
    if r.rate.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "rate must be more than 0".to_owned(),
        ));
    }
    let options = ReplayOptions {
        dry_run: r.dry_run,
        rate: r.rate,
    };
    let sel = move_selector(r)?;
    Ok(Json(dlq::replay_with(&s.conn, &q, &sel, &options).await?).into_response())
}

async fn purge(
    WriteRequest { s, q, body: r }: WriteRequest<MoveRequest>,
) -> Result<Response, ApiError> {
    let dry_run = r.dry_run;
    let sel = move_selector(r)?;
    Ok(Json(dlq::purge(&s.conn, &q, &sel, dry_run).await?).into_response())
}

/// An edit request.
#[derive(Debug, Deserialize)]
struct EditRequest {
    id: String,
    #[serde(default)]
    json_set: Vec<String>,
    body_base64: Option<String>,
}

async fn edit(
    WriteRequest { s, q, body: r }: WriteRequest<EditRequest>,
) -> Result<Response, ApiError> {
    use base64::Engine as _;
    let change = match (r.body_base64, r.json_set.is_empty()) {
        (Some(b), true) => dlq::Edit::Body(
            base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("body_base64: {e}")))?,
        ),
        (None, false) => dlq::Edit::JsonSet(
            r.json_set
                .iter()
                .map(|a| dlq::parse_json_set(a))
                .collect::<Result<_, _>>()?,
        ),
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give either json_set or body_base64".to_owned(),
            ))
        }
    };
    Ok(Json(dlq::edit(&s.conn, &q, &r.id, &change).await?).into_response())
}

/// Serves the console on `listen` until `stop` resolves.
pub async fn serve(
    conn: Connection,
    config: ConsoleConfig,
    listen: std::net::SocketAddr,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), CliError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::Usage(format!("cannot listen on {listen}: {e}")))?;
    axum::serve(listener, router(conn, config))
        .with_graceful_shutdown(stop)
        .await
        .map_err(|e| CliError::Failed(format!("the console server failed: {e}")))
}
