//! Storage holds in the shared SQL store (UsageStore::hold_storage), against
//! SQLite (always) and PostgreSQL (when DATABASE_URL is set): what counts as
//! held, and that concurrent holds of one user serialize.

use std::sync::Arc;

use chrono::{Duration, Utc};
use ragchat::config::DatabaseSettings;
use ragchat_actors::ports::{Reservation, UsageStore};
use uuid::Uuid;

use crate::helpers::fresh_postgres_url;

async fn connect(url: &str) -> Arc<dyn UsageStore> {
    ragchat::stores::connect(&DatabaseSettings {
        url: url.to_string(),
        max_connections: 8,
        acquire_timeout_ms: 5000,
    })
    .await
    .expect("store connects and migrates")
    .usage
}

async fn sqlite() -> Arc<dyn UsageStore> {
    let dir = std::env::temp_dir().join("ragchat-tests");
    let _ = std::fs::create_dir_all(&dir);
    connect(&format!(
        "sqlite:{}",
        dir.join(format!("{}.db", Uuid::new_v4())).display()
    ))
    .await
}

async fn postgres() -> Option<Arc<dyn UsageStore>> {
    Some(connect(&fresh_postgres_url().await?).await)
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(#[actix_web::test] async fn $name() { super::$name(super::sqlite().await).await; })*
        }
        mod postgres_backend {
            $(#[actix_web::test] async fn $name() {
                if let Some(store) = super::postgres().await { super::$name(store).await; }
            })*
        }
    };
}

contract!(
    a_released_hold_still_counts_for_a_reader_that_began_before_its_release,
    concurrent_holds_of_one_user_never_pass_the_limit,
);

fn long_ago() -> chrono::DateTime<Utc> {
    Utc::now() - Duration::minutes(30)
}

async fn a_released_hold_still_counts_for_a_reader_that_began_before_its_release(store: Arc<dyn UsageStore>) {
    let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
    let hold = |id: Uuid, bytes: u64, stored: u64, epoch: u64| {
        let store = store.clone();
        async move {
            store
                .hold_storage(user, id, bytes, stored, epoch, 1200, long_ago())
                .await
                .expect("hold")
        }
    };
    let e0 = store.storage_epoch(user).await.expect("epoch");
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(hold(a, 400, 0, e0).await, Reservation::Granted { used: 400 });
    assert_eq!(hold(b, 400, 0, e0).await, Reservation::Granted { used: 800 });
    assert_eq!(
        hold(Uuid::new_v4(), 401, 0, e0).await,
        Reservation::Denied { used: 800 }
    );
    // Another user's holds are theirs.
    assert!(matches!(
        store
            .hold_storage(other, Uuid::new_v4(), 1200, 0, 0, 1200, long_ago())
            .await
            .expect("hold"),
        Reservation::Granted { .. }
    ));

    store.release_storage(user, a).await.expect("release");
    let e1 = store.storage_epoch(user).await.expect("epoch");
    assert!(e1 > e0, "{e0} -> {e1}");
    // A reader whose stored-bytes read began before the release may have missed
    // a's documents: a still counts for it.
    assert_eq!(
        hold(Uuid::new_v4(), 401, 0, e0).await,
        Reservation::Denied { used: 800 }
    );
    // A reader that began after it sees a's documents in the store (or their
    // absence, when storing them failed): a no longer counts.
    assert_eq!(
        hold(Uuid::new_v4(), 401, 400, e1).await,
        Reservation::Denied { used: 800 }
    );
    let c = Uuid::new_v4();
    assert_eq!(hold(c, 401, 0, e1).await, Reservation::Granted { used: 801 });
    // Releasing twice, or a hold of another user, changes nothing held.
    store.release_storage(user, a).await.expect("release again");
    store.release_storage(other, c).await.expect("not theirs");
    let e2 = store.storage_epoch(user).await.expect("epoch");
    assert_eq!(
        hold(Uuid::new_v4(), 400, 0, e2).await,
        Reservation::Denied { used: 801 }
    );

    // Holds nobody released stop counting once older than `expire_before`.
    let later = Utc::now() + Duration::seconds(1);
    assert_eq!(
        store
            .hold_storage(user, Uuid::new_v4(), 1200, 0, e2, 1200, later)
            .await
            .expect("hold"),
        Reservation::Granted { used: 1200 }
    );
}

async fn concurrent_holds_of_one_user_never_pass_the_limit(store: Arc<dyn UsageStore>) {
    let user = Uuid::new_v4();
    let tries = (0..24).map(|_| {
        let store = store.clone();
        async move {
            let epoch = store.storage_epoch(user).await.expect("epoch");
            store
                .hold_storage(user, Uuid::new_v4(), 100, 0, epoch, 1000, long_ago())
                .await
                .expect("hold")
        }
    });
    let outcomes = futures_util::future::join_all(tries).await;
    let granted = outcomes
        .iter()
        .filter(|o| matches!(o, Reservation::Granted { .. }))
        .count();
    assert_eq!(granted, 10, "{outcomes:?}");
}
