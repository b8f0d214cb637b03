//! The knowledge base: ingestion (JSON text), listing, reading and deleting
//! documents, and search over the chunks the caller may see.

use actix_web::{web, HttpResponse};
use chrono::Utc;
use ragchat_actors::domain::Page;
use ragchat_actors::inference::ModelError;
use ragchat_actors::knowledge::{Document, Owner};
use ragchat_actors::retrieval::{
    invalid_filter, text_within, top_k_within, Filters, Hit, Query, RemoveDocument, RetrievalError, Route,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use ragchat_actors::admission::registry::Ticket;

use super::admission::{rejection_error, Admitted, BackgroundTask, IngestCall, SearchCall};
use super::extractors::{access, CurrentUser, Scoped};
use super::AppState;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::knowledge::formats::{self, Format, FormatLimits};
use crate::knowledge::ingest::{validate, DocLimits, IngestError, Ingestor, NewDoc, Outcome};
use crate::knowledge::jobs::{Batch, Job, JobKind, JobView, Refusal};

/// The routes; `max_document_bytes` sets the body limit of the ingestion route
/// (twice the text, for JSON escapes, plus room for the other fields).
pub fn routes(max_document_bytes: usize) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| configure(cfg, max_document_bytes.saturating_mul(2).saturating_add(64 << 10))
}

fn configure(cfg: &mut web::ServiceConfig, limit: usize) {
    cfg.service(
        web::resource("/knowledge/documents")
            .app_data(
                web::JsonConfig::default()
                    .limit(limit)
                    .error_handler(crate::error::json_error),
            )
            .route(
                web::post()
                    .guard(actix_web::guard::fn_guard(is_multipart))
                    .to(upload_document),
            )
            .route(web::post().to(create_document))
            .route(web::get().to(list_documents)),
    )
    .service(
        web::resource("/knowledge/documents/{id}")
            .route(web::get().to(get_document))
            .route(web::delete().to(delete_document)),
    )
    .service(web::resource("/knowledge/search").route(web::post().to(search)))
    .service(web::resource("/knowledge/reindex").route(web::post().to(reindex)))
    .service(web::resource("/knowledge/jobs").route(web::get().to(list_jobs)))
    .service(web::resource("/knowledge/jobs/{id}").route(web::get().to(get_job)))
    .service(web::resource("/knowledge/jobs/{id}/cancel").route(web::post().to(cancel_job)));
}

fn is_multipart(ctx: &actix_web::guard::GuardContext) -> bool {
    ctx.head()
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"))
}

/// Who may see a new document.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Only the uploader.
    #[default]
    Private,
    /// Every member of the uploader's organization.
    Organization,
    /// Everybody (admins only).
    Global,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDocument {
    pub title: String,
    pub content: String,
    pub source: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub visibility: Visibility,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DocumentView {
    pub id: Uuid,
    pub title: String,
    pub source: String,
    /// How it reached the knowledge base: `api`, `upload:<format>` or `seed`.
    pub source_type: String,
    pub visibility: Visibility,
    pub size_bytes: u64,
    pub chunk_count: u32,
    pub content_hash: String,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, Value>,
    pub created_at: chrono::DateTime<Utc>,
    /// True when the same text was already stored (nothing new was written).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

fn view(d: Document, duplicate: bool) -> DocumentView {
    DocumentView {
        id: d.id,
        title: d.title,
        source: d.source,
        source_type: d.origin,
        visibility: match d.owner {
            Owner::User(_) => Visibility::Private,
            Owner::Organization(_) => Visibility::Organization,
            Owner::Global => Visibility::Global,
        },
        size_bytes: d.size_bytes,
        chunk_count: d.chunk_count,
        content_hash: d.content_hash,
        metadata: d.metadata,
        created_at: d.created_at,
        duplicate,
    }
}

fn ingestor(state: &AppState) -> Result<&Ingestor, ApiError> {
    state.ingestor.as_ref().ok_or_else(|| {
        ApiError::Unavailable("The embedding model is not loaded (run scripts/fetch-models)".into())
            .with_code(ErrorCode::ModelNotLoaded)
    })
}

fn owner_for(current: &CurrentUser, visibility: Visibility) -> Result<Owner, ApiError> {
    let user = &current.user;
    match visibility {
        Visibility::Private => Ok(Owner::User(user.id)),
        Visibility::Organization => {
            Ok(Owner::Organization(user.organization_id.ok_or_else(|| {
                ApiError::BadRequest("You do not belong to an organization".into())
            })?))
        }
        // A superuser's key needs the admin scope for this too.
        Visibility::Global if current.is_admin() => Ok(Owner::Global),
        Visibility::Global => {
            Err(ApiError::Forbidden("Only admins can add global documents".into()).with_code(ErrorCode::AdminRequired))
        }
    }
}

/// Stores checked documents of one owner: duplicates come back as such; new
/// private text is held against the uploader's storage quota by their session
/// actor (so concurrent uploads cannot both pass the limit) while it is stored.
/// `ticket`, the request's admitted unit, is completed with `usage` (plus the
/// count of new documents) as soon as anything was stored, inside the storing
/// task: a client that leaves once its documents are stored still pays for them.
async fn ingest(
    state: &AppState,
    user: &ragchat_actors::domain::User,
    docs: Vec<NewDoc>,
    ticket: Option<Ticket>,
    usage: Value,
) -> Result<Vec<Outcome>, ApiError> {
    let ingestor = ingestor(state)?.clone();
    let triage = ingestor.triage(docs).await?;
    let bytes = triage.new_bytes(&Owner::User(user.id));
    let held = if bytes > 0 {
        let grant = state
            .registry
            .reserve_storage(user.id, state.documents.clone(), bytes)
            .await
            .map_err(rejection_error)?;
        Some(HeldStorage {
            registry: state.registry.clone(),
            user_id: user.id,
            grant,
        })
    } else {
        None
    };
    // Its own task: a client that goes away mid-way cannot leave a batch half
    // stored or a grant held; the guard hands the grant back when it ends.
    let task = actix_web::rt::spawn(async move {
        let stored = ingestor.store(triage).await;
        drop(held);
        let created = stored.as_ref().map(|o| created(o)).unwrap_or(0);
        match ticket {
            Some(t) if created > 0 => {
                let mut usage = usage;
                if let Some(m) = usage.as_object_mut() {
                    m.insert("documents".into(), json!(created));
                }
                t.complete(usage);
            }
            // Nothing stored: the unit goes back when the ticket drops.
            _ => {}
        }
        stored
    });
    Ok(task.await.map_err(ApiError::internal)??)
}

fn created(outcomes: &[Outcome]) -> usize {
    outcomes.iter().filter(|o| matches!(o, Outcome::Created(_))).count()
}

/// A storage grant, handed back to the session when dropped.
struct HeldStorage {
    registry: std::sync::Arc<ragchat_actors::admission::registry::SessionRegistry>,
    user_id: Uuid,
    grant: ragchat_actors::admission::storage::StorageGrant,
}

impl Drop for HeldStorage {
    fn drop(&mut self) {
        self.registry.release_storage(self.user_id, self.grant);
    }
}

/// Stores a text document: chunked by tokens, embedded, indexed. The same text
/// from the same owner is stored once (200 with `duplicate: true`). A
/// `multipart/form-data` body uploads a file instead (see `upload_document`).
#[utoipa::path(post, path = "/knowledge/documents", tag = "knowledge", security(("bearer" = [])),
    request_body(content(
        (NewDocument = "application/json"),
        (UploadForm = "multipart/form-data"),
    )),
    responses((status = 201, body = DocumentView, description = "Stored: a DocumentView for a JSON body, an UploadResult for an upload"),
        (status = 202, body = JobView, description = "An upload over `knowledge.jobs_min_upload_bytes` or of at least `knowledge.jobs_min_documents` documents (or with `background=true`) became a background job: follow `Location`"),
        (status = 200, body = DocumentView, description = "Already stored"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `ingest` scope (insufficient_scope), global visibility and no admin powers, or a deactivated account"),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create_document(
    admitted: Admitted<IngestCall>,
    state: web::Data<AppState>,
    body: web::Json<NewDocument>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let user = admitted.user.user.clone();
    let mut doc = NewDoc {
        owner: owner_for(&admitted.user, body.visibility)?,
        title: body.title,
        content: body.content,
        source: body.source.unwrap_or_default(),
        origin: "api".into(),
        metadata: body.metadata.unwrap_or_default(),
    };
    validate(&mut doc, DocLimits::of(&state.settings.knowledge))?;
    let usage = json!({"endpoint": "/knowledge/documents", "bytes": doc.content.len()});
    let outcome = ingest(&state, &user, vec![doc], Some(admitted.into_ticket()), usage)
        .await?
        .pop()
        .ok_or_else(|| ApiError::Internal("ingestion returned nothing".into()))?;
    match outcome {
        Outcome::Created(d) => Ok(HttpResponse::Created().json(view(d, false))),
        Outcome::Duplicate(d) => Ok(HttpResponse::Ok().json(view(d, true))),
    }
}

/// The multipart form of an upload (documentation only; parsed by hand).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The file: .txt, .md, .html, .pdf, or .jsonl (one document per line:
    /// {"title", "text" or "content", "source"?, "metadata"?, "_id"?}).
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// private (default), organization or global (admins).
    visibility: Option<Visibility>,
    /// Overrides the title taken from the file (single-document files).
    title: Option<String>,
    source: Option<String>,
    /// A JSON object, merged into each document's metadata.
    metadata: Option<String>,
    /// `true`: store it as a background job (202) whatever its size.
    background: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UploadResult {
    pub documents: Vec<DocumentView>,
    pub created: usize,
    pub duplicates: usize,
}

struct Upload {
    filename: String,
    content_type: Option<String>,
    bytes: Vec<u8>,
}

async fn read_field(field: &mut actix_multipart::Field, limit: usize, what: &str) -> Result<Vec<u8>, ApiError> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    while let Some(chunk) = field.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("Cannot read the upload: {e}")))?;
        if out.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(format!(
                "{what} is over the limit of {limit} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Uploads one file as `multipart/form-data` (field `file`; optional fields
/// `visibility`, `title`, `source`, `metadata`). A .jsonl file holds several
/// documents: all of them are stored, or (on any bad line) none.
pub async fn upload_document(
    admitted: Admitted<IngestCall>,
    state: web::Data<AppState>,
    mut form: actix_multipart::Multipart,
) -> Result<HttpResponse, ApiError> {
    use futures_util::StreamExt;
    let k = &state.settings.knowledge;
    let mut file: Option<Upload> = None;
    let (mut visibility, mut title, mut source, mut metadata) = (Visibility::Private, None, None, None);
    let mut background = false;
    while let Some(field) = form.next().await {
        let mut field = field.map_err(|e| ApiError::BadRequest(format!("Malformed multipart body: {e}")))?;
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" => {
                if file.is_some() {
                    return Err(ApiError::Unprocessable("Upload one file per request".into()));
                }
                let filename = field
                    .content_disposition()
                    .and_then(|cd| cd.get_filename())
                    .map(str::to_string)
                    .unwrap_or_default();
                let content_type = field.content_type().map(|m| m.essence_str().to_string());
                let bytes = read_field(&mut field, k.max_upload_bytes, "The file").await?;
                file = Some(Upload {
                    filename,
                    content_type,
                    bytes,
                });
            }
            "visibility" | "title" | "source" | "metadata" | "background" => {
                let raw = read_field(&mut field, 64 << 10, &format!("Field '{name}'")).await?;
                let text = String::from_utf8(raw)
                    .map_err(|_| ApiError::Unprocessable(format!("Field '{name}' is not UTF-8 text")))?;
                match name.as_str() {
                    "visibility" => {
                        visibility = serde_json::from_value(Value::String(text.trim().to_string())).map_err(|_| {
                            ApiError::Unprocessable("visibility must be private, organization or global".into())
                        })?
                    }
                    "title" => title = Some(text),
                    "source" => source = Some(text),
                    "background" => {
                        background = match text.trim() {
                            "true" | "1" => true,
                            "false" | "0" => false,
                            _ => return Err(ApiError::Unprocessable("background must be true or false".into())),
                        }
                    }
                    _ => {
                        let m: serde_json::Map<String, Value> = serde_json::from_str(&text)
                            .map_err(|e| ApiError::Unprocessable(format!("metadata must be a JSON object: {e}")))?;
                        metadata = Some(m);
                    }
                }
            }
            other => return Err(ApiError::Unprocessable(format!("Unknown form field '{other}'"))),
        }
    }
    let file = file.ok_or_else(|| ApiError::Unprocessable("The form needs a 'file' field".into()))?;
    let user = admitted.user.user.clone();
    let owner = owner_for(&admitted.user, visibility)?;
    let format = Format::detect(&file.filename, file.content_type.as_deref())?;
    let name = file.filename.clone();
    let name_for_job = file.filename.clone();
    let upload_bytes = file.bytes.len();
    let limits = FormatLimits::of(k);
    let extracted = web::block(move || formats::extract(&name, format, &file.bytes, &limits))
        .await
        .map_err(ApiError::internal)??;
    let single = extracted.len() == 1;
    let mut docs = Vec::with_capacity(extracted.len());
    for e in extracted {
        let mut meta = e.metadata;
        if let Some(extra) = &metadata {
            meta.extend(extra.clone());
        }
        let mut d = NewDoc {
            owner,
            title: match (&title, single) {
                (Some(t), true) => t.clone(),
                _ => e.title,
            },
            content: e.content,
            source: source.clone().unwrap_or(e.source),
            origin: format!("upload:{}", format.name()),
            metadata: meta,
        };
        validate(&mut d, DocLimits::of(k)).map_err(|err| match err {
            IngestError::Invalid(m) | IngestError::TooLarge(m) if !single => {
                ApiError::Unprocessable(format!("'{}': {m}", d.source))
            }
            other => other.into(),
        })?;
        docs.push(d);
    }
    let bytes: usize = docs.iter().map(|d| d.content.len()).sum();
    let usage = json!({"endpoint": "/knowledge/documents", "upload": file.filename, "bytes": bytes});
    if background || upload_bytes > k.jobs_min_upload_bytes || docs.len() >= k.jobs_min_documents.max(2) {
        return start_job(&state, admitted, docs, name_for_job, usage).await;
    }
    let outcomes = ingest(&state, &user, docs, Some(admitted.into_ticket()), usage).await?;
    let created = created(&outcomes);
    let result = UploadResult {
        duplicates: outcomes.len() - created,
        created,
        documents: outcomes
            .into_iter()
            .map(|o| match o {
                Outcome::Created(d) => view(d, false),
                Outcome::Duplicate(d) => view(d, true),
            })
            .collect(),
    };
    if created > 0 {
        Ok(HttpResponse::Created().json(result))
    } else {
        Ok(HttpResponse::Ok().json(result))
    }
}

/// Turns an upload into a background job: one `background_tasks` unit instead of
/// the request's `api_calls` unit, 202 with the job, stored batch by batch by a
/// task of its own.
async fn start_job(
    state: &web::Data<AppState>,
    admitted: Admitted<IngestCall>,
    docs: Vec<NewDoc>,
    filename: String,
    usage: Value,
) -> Result<HttpResponse, ApiError> {
    ingestor(state)?;
    let user = admitted.user.clone();
    let task = Admitted::<BackgroundTask>::admit(state, user.clone()).await?;
    let job = state
        .jobs
        .create(user.user.id, JobKind::Upload, Some(&filename), docs.len())
        .map_err(refused)?;
    // The request itself is not counted: the job is.
    admitted.release();
    let view = job.view();
    let batch = state.settings.knowledge.jobs_batch_documents.max(1);
    actix_web::rt::spawn(run_job(
        state.clone(),
        user.user,
        docs,
        job,
        task.into_ticket(),
        usage,
        batch,
    ));
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/knowledge/jobs/{}", view.id)))
        .json(view))
}

fn refused(r: Refusal) -> ApiError {
    match r {
        Refusal::UserBusy(n) => ApiError::TooManyRequests {
            detail: json!(format!(
                "You have {n} background jobs that have not finished: wait for one (GET /knowledge/jobs) or cancel it"
            )),
            headers: vec![("Retry-After", "5".into())],
        }
        .with_code(ErrorCode::TooManyJobs),
        Refusal::Full => {
            ApiError::Unavailable("The server is busy with other background jobs: try again shortly".into())
        }
    }
}

/// Stores a job's documents `batch` at a time, until done or cancelled. Its unit
/// counts from the first batch that stores something; a job that stored nothing
/// gives it back.
async fn run_job(
    state: web::Data<AppState>,
    user: ragchat_actors::domain::User,
    mut docs: Vec<NewDoc>,
    job: Job,
    ticket: Ticket,
    usage: Value,
    batch: usize,
) {
    let Some(_runner) = job.start().await else {
        job.finish(None);
        return;
    };
    let mut ticket = Some(ticket);
    let (mut done, mut fatal) = (0usize, None);
    while !docs.is_empty() && !job.cancelled() {
        let rest = docs.split_off(batch.min(docs.len()));
        let chunk = std::mem::replace(&mut docs, rest);
        let n = chunk.len();
        match ingest(&state, &user, chunk, None, Value::Null).await {
            Ok(outcomes) => {
                let created = created(&outcomes);
                job.record(Batch::Stored {
                    created,
                    duplicate: outcomes.len() - created,
                });
                if created > 0 {
                    if let Some(t) = ticket.take() {
                        let mut usage = usage.clone();
                        if let Some(o) = usage.as_object_mut() {
                            o.insert("job_id".into(), json!(job.id()));
                        }
                        t.complete(usage);
                    }
                }
            }
            Err(e) => {
                let stop = matches!(e.code(), ErrorCode::StorageQuotaExceeded | ErrorCode::ModelNotLoaded);
                job.record(Batch::Failed {
                    documents: n,
                    error: format!("documents {}-{}: {e}", done + 1, done + n),
                });
                if stop {
                    fatal = Some("stopped: the documents after these would fail the same way".into());
                    break;
                }
            }
        }
        done += n;
    }
    // A job that stored nothing gives its unit back (the ticket drops here).
    drop(ticket);
    let view = job.finish(fatal);
    tracing::info!(job = %view.id, state = ?view.state, created = view.documents_created, failed = view.documents_failed, "upload job ended");
}

/// What to re-index.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReindexRequest {
    /// Your own (private) documents to re-index, at most
    /// `knowledge.reindex_max_documents`; absent: all of your documents. Ids
    /// that are not your documents are reported as failed and left alone.
    pub document_ids: Option<Vec<Uuid>>,
}

/// Reads a small optional JSON body: empty means the default.
async fn optional_json<T: serde::de::DeserializeOwned + Default>(
    mut payload: web::Payload,
    limit: usize,
) -> Result<T, ApiError> {
    use futures_util::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("Cannot read the request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(format!(
                "Request body too large: the limit is {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| {
        if e.is_data() {
            ApiError::Unprocessable(format!("Invalid request body: {e}"))
        } else {
            ApiError::BadRequest(format!("Malformed JSON: {e}")).with_code(ErrorCode::MalformedJson)
        }
    })
}

/// Re-indexes your documents as a background job: each document's stored text is
/// chunked again with the current chunking settings and embedded with the current
/// model, and its chunks are replaced (a search sees the old chunks or the new
/// ones, never neither nor both). One `background_tasks` unit, counted once a
/// document is re-indexed (a job that re-indexes nothing gives it back); it counts
/// against the limit of unfinished jobs per user and can be cancelled (what was
/// re-indexed stays, the rest is left as it was). Without a body, all of your
/// private documents.
#[utoipa::path(post, path = "/knowledge/reindex", tag = "knowledge", security(("bearer" = [])),
    request_body(content = Option<ReindexRequest>, content_type = "application/json"),
    responses((status = 202, body = JobView, description = "The job: follow `Location`"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `ingest` scope (insufficient_scope), or a deactivated account"),
        (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "An empty or too long `document_ids`, or no documents to re-index"),
        (status = 429, body = ErrorBody, description = "Rate limit, the `background_tasks` quota, or too many unfinished jobs (too_many_jobs)"),
        (status = 503, body = ErrorBody)))]
pub async fn reindex(
    admitted: Admitted<BackgroundTask>,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let max = state.settings.knowledge.reindex_max_documents;
    // Room for `max` ids as JSON strings, and some whitespace.
    let body: ReindexRequest = optional_json(payload, max.saturating_mul(48).saturating_add(4096)).await?;
    ingestor(&state)?;
    let user = admitted.user.user.clone();
    let ids: Vec<Uuid> = match body.document_ids {
        Some(ids) => {
            let mut seen = std::collections::HashSet::new();
            let ids: Vec<Uuid> = ids.into_iter().filter(|id| seen.insert(*id)).collect();
            if ids.is_empty() {
                return Err(ApiError::Unprocessable(
                    "document_ids must name at least one document".into(),
                ));
            }
            if ids.len() > max {
                return Err(ApiError::Unprocessable(format!(
                    "document_ids names {} documents: at most {max} per request (or none, for all of yours)",
                    ids.len()
                )));
            }
            ids
        }
        None => state.documents.document_ids(Some(&Owner::User(user.id))).await?,
    };
    if ids.is_empty() {
        return Err(ApiError::Unprocessable("You have no documents to re-index".into()));
    }
    let job = state
        .jobs
        .create(user.id, JobKind::Reindex, None, ids.len())
        .map_err(refused)?;
    let view = job.view();
    let ticket = admitted.into_ticket();
    actix_web::rt::spawn(run_reindex(state.clone(), user.id, ids, job, ticket));
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/knowledge/jobs/{}", view.id)))
        .json(view))
}

/// Tries of one document while the embedding worker's bulk lane is full.
const REINDEX_RETRIES: usize = 20;

/// Re-indexes a job's documents one at a time until done or cancelled; only the
/// user's own private documents are touched. Its unit counts from the first
/// document re-indexed.
async fn run_reindex(state: web::Data<AppState>, user_id: Uuid, ids: Vec<Uuid>, job: Job, ticket: Ticket) {
    let Some(_runner) = job.start().await else {
        job.finish(None);
        return;
    };
    let Ok(ingestor) = ingestor(&state).cloned() else {
        job.finish(Some("The embedding model is not loaded".into()));
        return;
    };
    let mut ticket = Some(ticket);
    let mut fatal = None;
    for id in ids {
        if job.cancelled() {
            break;
        }
        let failed = |error: String| Batch::Failed { documents: 1, error };
        let doc = match state.documents.document(id).await {
            Ok(Some(d)) if d.owner == Owner::User(user_id) => d,
            // Someone else's reads as missing.
            Ok(_) => {
                job.record(failed(format!("{id}: not found")));
                continue;
            }
            Err(e) => {
                job.record(failed(format!("{id}: {e}")));
                continue;
            }
        };
        // A full bulk lane is waited out (a background job is in no hurry).
        let mut outcome = ingestor.reindex(&doc).await;
        for _ in 0..REINDEX_RETRIES {
            if !matches!(outcome, Err(IngestError::Model(ModelError::Overloaded(_)))) || job.cancelled() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            outcome = ingestor.reindex(&doc).await;
        }
        match outcome {
            Ok(Some(_)) => {
                job.record(Batch::Reindexed(1));
                if let Some(t) = ticket.take() {
                    t.complete(json!({"endpoint": "/knowledge/reindex", "job_id": job.id()}));
                }
            }
            Ok(None) => job.record(failed(format!("{id}: not found (deleted meanwhile)"))),
            Err(e) => {
                let stop = matches!(e, IngestError::Model(ModelError::Unavailable(_)));
                job.record(failed(format!("{id}: {e}")));
                if stop {
                    fatal = Some("stopped: the embedding model is not running".into());
                    break;
                }
            }
        }
    }
    drop(ticket);
    let view = job.finish(fatal);
    tracing::info!(job = %view.id, state = ?view.state, done = view.documents_done, failed = view.documents_failed, "reindex job ended");
}

/// The caller's background jobs (uploads and re-indexing), newest first.
#[utoipa::path(get, path = "/knowledge/jobs", tag = "knowledge", security(("bearer" = [])),
    responses((status = 200, body = [JobView]), (status = 401, body = ErrorBody)))]
pub async fn list_jobs(current: Scoped<access::Documents>, state: web::Data<AppState>) -> web::Json<Vec<JobView>> {
    web::Json(state.jobs.list(current.user.id))
}

fn job_not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("Job {id} not found")).with_code(ErrorCode::JobNotFound)
}

/// One background job of the caller: its state and progress.
#[utoipa::path(get, path = "/knowledge/jobs/{job_id}", tag = "knowledge", security(("bearer" = [])),
    params(("job_id" = Uuid, Path, description = "The job's id")),
    responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn get_job(
    current: Scoped<access::Documents>,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<web::Json<JobView>, ApiError> {
    let id = id.into_inner();
    state
        .jobs
        .get(current.user.id, id)
        .map(web::Json)
        .ok_or_else(|| job_not_found(id))
}

/// Cancels a background job after the batch it is storing (what was stored
/// stays, and counts). 202 with the job; 409 when it has already finished.
#[utoipa::path(post, path = "/knowledge/jobs/{job_id}/cancel", tag = "knowledge", security(("bearer" = [])),
    params(("job_id" = Uuid, Path, description = "The job's id")),
    responses((status = 202, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn cancel_job(
    current: Scoped<access::Ingest>,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    match state.jobs.cancel(current.user.id, id) {
        Ok(view) => Ok(HttpResponse::Accepted().json(view)),
        Err(Some(ended)) => Err(ApiError::Conflict(format!(
            "Job {id} has already ended ({})",
            serde_json::to_value(ended)
                .unwrap_or_default()
                .as_str()
                .unwrap_or("finished")
        ))),
        Err(None) => Err(job_not_found(id)),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    #[serde(default)]
    pub offset: u32,
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DocumentList {
    pub items: Vec<DocumentView>,
    pub total: u64,
    pub offset: u32,
    pub limit: u32,
}

/// Documents the caller may see (their own, their organization's, global), newest first.
#[utoipa::path(get, path = "/knowledge/documents", tag = "knowledge", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = DocumentList), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `search` or `ingest` scope (insufficient_scope), or a deactivated account"),
        (status = 422, body = ErrorBody)))]
pub async fn list_documents(
    current: Scoped<access::Documents>,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<web::Json<DocumentList>, ApiError> {
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::Unprocessable("limit must be 1 to 100".into()));
    }
    let page = Page {
        offset: query.offset,
        limit,
    };
    let (docs, total) = state.documents.list_documents(&current.reader(), page).await?;
    Ok(web::Json(DocumentList {
        items: docs.into_iter().map(|d| view(d, false)).collect(),
        total,
        offset: page.offset,
        limit,
    }))
}

async fn visible(state: &AppState, current: &CurrentUser, id: Uuid) -> Result<Document, ApiError> {
    match state.documents.document(id).await? {
        Some(d) if current.reader().may_see(&d.owner) => Ok(d),
        _ => Err(ApiError::NotFound("Document not found".into()).with_code(ErrorCode::DocumentNotFound)),
    }
}

/// One document the caller may see.
#[utoipa::path(get, path = "/knowledge/documents/{id}", tag = "knowledge", security(("bearer" = [])),
    responses((status = 200, body = DocumentView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `search` or `ingest` scope (insufficient_scope), or a deactivated account"),
        (status = 404, body = ErrorBody)))]
pub async fn get_document(
    current: Scoped<access::Documents>,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<web::Json<DocumentView>, ApiError> {
    Ok(web::Json(view(visible(&state, &current, *id).await?, false)))
}

/// Deletes a document and its chunks: private ones by their owner, organization
/// ones by its members, global ones by admins.
#[utoipa::path(delete, path = "/knowledge/documents/{id}", tag = "knowledge", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `ingest` scope (insufficient_scope), a global document and no admin powers, or a deactivated account"),
        (status = 404, body = ErrorBody)))]
pub async fn delete_document(
    current: Scoped<access::Ingest>,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let doc = visible(&state, &current, *id).await?;
    if doc.owner == Owner::Global && !current.is_admin() {
        return Err(
            ApiError::Forbidden("Only admins can delete global documents".into()).with_code(ErrorCode::AdminRequired)
        );
    }
    // The store first: if it fails, the document is still there and still found.
    state.documents.delete_document(doc.id).await?;
    let retrieval = state.retrieval.actor().ok_or(RetrievalError::NotRunning)?;
    retrieval
        .send(RemoveDocument(doc.id))
        .await
        .map_err(|e| RetrievalError::Mailbox(e.to_string()))?
        .map_err(RetrievalError::Index)?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub query: String,
    /// Results, 1 to `knowledge.search_max_top_k` (default `knowledge.search_default_top_k`).
    pub top_k: Option<usize>,
    #[serde(default)]
    pub route: Route,
    /// Metadata conditions: {"field": value}, {"field": {"in": [...]}},
    /// {"field": {"gte": 1, "lt": 5}}.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub filters: Filters,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResponse {
    pub query: String,
    /// The route that ran (`auto` resolved).
    pub route: Route,
    pub results: Vec<Hit>,
}

/// Searches the chunks the caller may see.
#[utoipa::path(post, path = "/knowledge/search", tag = "knowledge", security(("bearer" = [])),
    request_body = SearchRequest,
    responses((status = 200, body = SearchResponse), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `search` scope (insufficient_scope), or a deactivated account"),
        (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn search(
    admitted: Admitted<SearchCall>,
    state: web::Data<AppState>,
    body: web::Json<SearchRequest>,
) -> Result<web::Json<SearchResponse>, ApiError> {
    let body = body.into_inner();
    let k = &state.settings.knowledge;
    let query = text_within(&body.query, "query", k.max_query_chars).map_err(ApiError::Unprocessable)?;
    let top_k =
        top_k_within(body.top_k, k.search_default_top_k, k.search_max_top_k).map_err(ApiError::Unprocessable)?;
    if let Some(m) = invalid_filter(&body.filters) {
        return Err(ApiError::Unprocessable(m));
    }
    let found = state
        .retrieval
        .search(Query {
            text: query.clone(),
            route: body.route,
            reader: admitted.user.reader(),
            filters: body.filters,
            top_k,
            text_without_embedder: false,
        })
        .await?;
    let (route, results) = (found.route, found.hits);
    admitted.complete(json!({"endpoint": "/knowledge/search", "route": route}));
    Ok(web::Json(SearchResponse { query, route, results }))
}
