//! The knowledge base: ingestion (JSON text), listing, reading and deleting
//! documents, and search over the chunks the caller may see.

use actix::Addr;
use actix_web::{web, HttpResponse};
use chrono::Utc;
use ragchat_actors::domain::Page;
use ragchat_actors::knowledge::{Chunk, Document, Owner, Reader};
use ragchat_actors::plans::Resource;
use ragchat_actors::ports::StoreError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use super::admission::{Admitted, ApiCall, SearchCall};
use super::extractors::CurrentUser;
use super::openai::model_error;
use super::AppState;
use crate::error::ApiError;
use crate::knowledge::index::{Filters, Hit, Route};
use crate::knowledge::retrieval::{IndexDocuments, RemoveDocument, Retrieval, Search};

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
            .route(web::post().to(create_document))
            .route(web::get().to(list_documents)),
    )
    .service(
        web::resource("/knowledge/documents/{id}")
            .route(web::get().to(get_document))
            .route(web::delete().to(delete_document)),
    )
    .service(web::resource("/knowledge/search").route(web::post().to(search)));
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

fn reader_of(u: &CurrentUser) -> Reader {
    Reader {
        user_id: u.user.id,
        organization_id: u.user.organization_id,
    }
}

fn retrieval(state: &AppState) -> Result<&Addr<Retrieval>, ApiError> {
    state
        .retrieval
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("The search index is not running".into()))
}

fn index_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("search index: {e}"))
}

/// Stores a text document: chunked by tokens, embedded, indexed. The same text
/// from the same owner is stored once (200 with `duplicate: true`).
#[utoipa::path(post, path = "/knowledge/documents", tag = "knowledge", security(("bearer" = [])),
    request_body = NewDocument,
    responses((status = 201, body = DocumentView), (status = 200, body = DocumentView, description = "Already stored"),
        (status = 400), (status = 403), (status = 413), (status = 422), (status = 429), (status = 503)))]
pub async fn create_document(
    admitted: Admitted<ApiCall>,
    state: web::Data<AppState>,
    body: web::Json<NewDocument>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let user = admitted.user.user.clone();
    let title = body.title.trim().to_string();
    if title.is_empty() || title.chars().count() > 500 {
        return Err(ApiError::Unprocessable("title must be 1 to 500 characters".into()));
    }
    if body.content.trim().is_empty() {
        return Err(ApiError::Unprocessable("content is empty".into()));
    }
    let max = state.settings.knowledge.max_document_bytes;
    if body.content.len() > max {
        return Err(ApiError::PayloadTooLarge(format!(
            "Document of {} bytes exceeds the limit of {max} bytes",
            body.content.len()
        )));
    }
    let owner = match body.visibility {
        Visibility::Private => Owner::User(user.id),
        Visibility::Organization => Owner::Organization(
            user.organization_id
                .ok_or_else(|| ApiError::BadRequest("You do not belong to an organization".into()))?,
        ),
        Visibility::Global if user.is_superuser => Owner::Global,
        Visibility::Global => return Err(ApiError::Forbidden("Only admins can add global documents".into())),
    };
    let hash = hex::encode(Sha256::digest(body.content.as_bytes()));
    if let Some(existing) = state.documents.document_by_hash(&owner, &hash).await? {
        return Ok(HttpResponse::Ok().json(view(existing, true)));
    }
    // Storage quota: the uploader's private documents plus this one.
    let limit_mb = state
        .billing
        .usage_summary(&user, Utc::now())
        .await?
        .limits
        .limit(Resource::StorageMb);
    let used = state.documents.stored_bytes(&Owner::User(user.id)).await?;
    let size = body.content.len() as u64;
    if matches!(owner, Owner::User(_)) && used + size > limit_mb.saturating_mul(1 << 20) {
        return Err(ApiError::PayloadTooLarge(format!(
            "Storage quota exceeded: {:.1} of {limit_mb} MB used, this document needs {:.2} MB",
            used as f64 / (1 << 20) as f64,
            size as f64 / (1 << 20) as f64
        )));
    }
    let chunker = state
        .chunker
        .clone()
        .ok_or_else(|| ApiError::Unavailable("The embedding model is not loaded (run scripts/fetch-models)".into()))?;
    let embedder = state
        .embedder
        .clone()
        .ok_or_else(|| ApiError::Unavailable("The embedding model is not loaded (run scripts/fetch-models)".into()))?;
    let content = body.content;
    let pieces = web::block(move || chunker.split(&content))
        .await
        .map_err(ApiError::internal)?;
    if pieces.is_empty() {
        return Err(ApiError::Unprocessable("content has no text to index".into()));
    }
    let vectors = embedder.embed(pieces.clone()).await.map_err(model_error)?.vectors;
    let id = Uuid::new_v4();
    let chunks: Vec<Chunk> = pieces
        .into_iter()
        .zip(vectors)
        .enumerate()
        .map(|(i, (content, embedding))| Chunk {
            id: Uuid::new_v4(),
            document_id: id,
            ordinal: i as u32,
            content,
            embedding,
        })
        .collect();
    let doc = Document {
        id,
        owner,
        title,
        source: body.source.unwrap_or_default(),
        content_hash: hash.clone(),
        size_bytes: size,
        metadata: body.metadata.unwrap_or_default(),
        chunk_count: chunks.len() as u32,
        created_at: Utc::now(),
    };
    match state.documents.insert_document(&doc, &chunks).await {
        Ok(()) => {}
        // The same text arrived twice at once: the other request stored it.
        Err(StoreError::Conflict(_)) => {
            if let Some(existing) = state.documents.document_by_hash(&owner, &hash).await? {
                return Ok(HttpResponse::Ok().json(view(existing, true)));
            }
            return Err(ApiError::Conflict("Document is being stored by another request".into()));
        }
        Err(e) => return Err(e.into()),
    }
    retrieval(&state)?
        .send(IndexDocuments(vec![(doc.clone(), chunks)]))
        .await
        .map_err(index_error)?
        .map_err(index_error)?;
    admitted.complete(json!({"endpoint": "/knowledge/documents", "document_id": id, "bytes": size}));
    Ok(HttpResponse::Created().json(view(doc, false)))
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
    responses((status = 200, body = DocumentList), (status = 401), (status = 422)))]
pub async fn list_documents(
    current: CurrentUser,
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
    let (docs, total) = state.documents.list_documents(&reader_of(&current), page).await?;
    Ok(web::Json(DocumentList {
        items: docs.into_iter().map(|d| view(d, false)).collect(),
        total,
        offset: page.offset,
        limit,
    }))
}

async fn visible(state: &AppState, current: &CurrentUser, id: Uuid) -> Result<Document, ApiError> {
    match state.documents.document(id).await? {
        Some(d) if reader_of(current).may_see(&d.owner) => Ok(d),
        _ => Err(ApiError::NotFound("Document not found".into())),
    }
}

/// One document the caller may see.
#[utoipa::path(get, path = "/knowledge/documents/{id}", tag = "knowledge", security(("bearer" = [])),
    responses((status = 200, body = DocumentView), (status = 404)))]
pub async fn get_document(
    current: CurrentUser,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<web::Json<DocumentView>, ApiError> {
    Ok(web::Json(view(visible(&state, &current, *id).await?, false)))
}

/// Deletes a document and its chunks: private ones by their owner, organization
/// ones by its members, global ones by admins.
#[utoipa::path(delete, path = "/knowledge/documents/{id}", tag = "knowledge", security(("bearer" = [])),
    responses((status = 204), (status = 403), (status = 404)))]
pub async fn delete_document(
    current: CurrentUser,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let doc = visible(&state, &current, *id).await?;
    if doc.owner == Owner::Global && !current.user.is_superuser {
        return Err(ApiError::Forbidden("Only admins can delete global documents".into()));
    }
    // The store first: if it fails, the document is still there and still found.
    state.documents.delete_document(doc.id).await?;
    retrieval(&state)?
        .send(RemoveDocument(doc.id))
        .await
        .map_err(index_error)?
        .map_err(index_error)?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub query: String,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    #[serde(default)]
    pub route: Route,
    /// Metadata conditions: {"field": value}, {"field": {"in": [...]}},
    /// {"field": {"gte": 1, "lt": 5}}.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub filters: Filters,
}

fn default_top_k() -> usize {
    5
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
    responses((status = 200, body = SearchResponse), (status = 422), (status = 429), (status = 503)))]
pub async fn search(
    admitted: Admitted<SearchCall>,
    state: web::Data<AppState>,
    body: web::Json<SearchRequest>,
) -> Result<web::Json<SearchResponse>, ApiError> {
    let body = body.into_inner();
    let query = body.query.trim().to_string();
    if query.is_empty() || query.chars().count() > 2000 {
        return Err(ApiError::Unprocessable("query must be 1 to 2000 characters".into()));
    }
    if !(1..=100).contains(&body.top_k) {
        return Err(ApiError::Unprocessable("top_k must be 1 to 100".into()));
    }
    if let Some((field, _)) = body.filters.iter().find(|(_, c)| !c.is_valid()) {
        return Err(ApiError::Unprocessable(format!(
            "filter on '{field}': a range needs gt, gte, lt or lte"
        )));
    }
    let route = body.route.resolve(&query);
    let embedding = if route == Route::Text {
        None
    } else {
        let embedder = state
            .embedder
            .clone()
            .ok_or_else(|| ApiError::Unavailable("The embedding model is not loaded; use route \"text\"".into()))?;
        embedder
            .embed(vec![query.clone()])
            .await
            .map_err(model_error)?
            .vectors
            .pop()
    };
    let results = retrieval(&state)?
        .send(Search {
            query: query.clone(),
            embedding,
            route,
            reader: reader_of(&admitted.user),
            filters: body.filters,
            top_k: body.top_k,
        })
        .await
        .map_err(index_error)?
        .map_err(index_error)?;
    admitted.complete(json!({"endpoint": "/knowledge/search", "route": route}));
    Ok(web::Json(SearchResponse { query, route, results }))
}
