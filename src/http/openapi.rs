//! The OpenAPI document, generated from the handlers' annotations, and Swagger UI.

use actix_web::{web, HttpResponse};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::{admin, auth, billing, chat, knowledge, metrics, openai, ops, ws};

#[derive(OpenApi)]
#[openapi(
    info(title = "ragchat", description = "RAG chatbot server with accounts, plans, quotas and billing."),
    paths(
        ops::health, ops::ready, metrics::metrics,
        auth::register, auth::login, auth::refresh, auth::logout, auth::me,
        auth::create_api_key, auth::list_api_keys, auth::delete_api_key,
        admin::list_users, admin::update_user, admin::user_audit,
        admin::list_upgrade_requests, admin::approve_upgrade_request, admin::reject_upgrade_request,
        admin::get_subscription_limits, admin::put_subscription_limits,
        admin::seed_enhanced, admin::seed_status, admin::actors,
        billing::plans, billing::subscription, billing::change_subscription, billing::cancel_subscription,
        billing::upgrade_request, billing::cancel_upgrade_request,
        billing::usage, billing::invoices, billing::probe_chat, billing::probe_search, billing::probe_api, billing::probe_open,
        openai::models, openai::embeddings, openai::chat_completions,
        knowledge::create_document, knowledge::list_documents, knowledge::get_document, knowledge::delete_document,
        knowledge::search, knowledge::reindex, knowledge::list_jobs, knowledge::get_job, knowledge::cancel_job,
        chat::message, chat::stream_message, chat::list_sessions, chat::session_messages, chat::delete_session,
        ws::ws_chat,
    ),
    components(schemas(knowledge::UploadResult, crate::knowledge::jobs::JobView, crate::knowledge::jobs::JobKind, knowledge::ReindexRequest, crate::error::ErrorBody, crate::error::ErrorCode, crate::error::ErrorType)),
    modifiers(&BearerAuth, &CommonErrors),
    tags((name = "auth"), (name = "billing"), (name = "openai", description = "OpenAI-compatible"), (name = "knowledge"), (name = "chat"), (name = "admin", description = "Superusers only"), (name = "ops"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT or API key (rck_…)")
                    .build(),
            ),
        );
    }
}

/// The answers every route gives the same way, listed on each route they apply
/// to so that the document matches the server (schemathesis checks it):
/// a JSON body that is not JSON is a 400 (a valid JSON value of the wrong shape is
/// a 422), a path or query parameter that does not parse is a 422, a body over
/// its size limit is a 413, and any authenticated route answers 403 to a
/// deactivated account (or a key without its scope).
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |why: &str| {
            ResponseBuilder::new()
                .description(why)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in ops.into_iter().flatten() {
                let json_body = op
                    .request_body
                    .as_ref()
                    .is_some_and(|b| b.content.contains_key("application/json"));
                let parsed_params = op.parameters.as_ref().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| matches!(p.parameter_in, ParameterIn::Path | ParameterIn::Query))
                });
                let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
                let responses = &mut op.responses.responses;
                if secured {
                    responses.entry("403".into()).or_insert_with(|| {
                        error("A deactivated account, or an API key without the scope this route needs").into()
                    });
                }
                if json_body {
                    responses
                        .entry("400".into())
                        .or_insert_with(|| error("The body is not valid JSON").into());
                    responses
                        .entry("413".into())
                        .or_insert_with(|| error("The body is over its size limit").into());
                }
                if json_body || parsed_params {
                    responses
                        .entry("422".into())
                        .or_insert_with(|| error("A field or parameter is not valid").into());
                }
            }
        }
    }
}

async fn docs_redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header(("Location", "/docs/"))
        .finish()
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/docs").route(web::get().to(docs_redirect)))
        .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", ApiDoc::openapi()));
}
