//! Smoke tests of each official driver against the real servers started by
//! scripts/services.sh: connect, write, read back, concurrent use. A service whose
//! URL is unset is skipped with a message (a failure under RAGCHAT_REQUIRE_SERVICES=1).

use futures_util::future::join_all;
use uuid::Uuid;

#[path = "../common/services.rs"]
mod services;
use services::service_url;

#[actix_web::test]
async fn postgres_through_sqlx() {
    let Some(url) = service_url("DATABASE_URL") else {
        return;
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("connect");
    let table = format!("smoke_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE TABLE {table} (id INT PRIMARY KEY, v TEXT NOT NULL)"))
        .execute(&pool)
        .await
        .expect("create");
    let writes = (0..50).map(|i| {
        let pool = pool.clone();
        let sql = format!("INSERT INTO {table} (id, v) VALUES ($1, $2)");
        async move {
            sqlx::query(&sql)
                .bind(i)
                .bind(format!("value-{i}"))
                .execute(&pool)
                .await
        }
    });
    for r in join_all(writes).await {
        r.expect("insert");
    }
    let (n, v): (i64, String) = sqlx::query_as(&format!(
        "SELECT (SELECT COUNT(*) FROM {table}), v FROM {table} WHERE id = 42"
    ))
    .fetch_one(&pool)
    .await
    .expect("read back");
    assert_eq!((n, v.as_str()), (50, "value-42"));
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .expect("drop");
}

#[actix_web::test]
async fn redis_through_the_redis_crate() {
    let Some(url) = service_url("REDIS_URL") else {
        return;
    };
    let client = redis::Client::open(url).expect("url");
    let conn = client.get_connection_manager().await.expect("connect");
    let key = format!("smoke:{}", Uuid::new_v4());
    let incrs = (0..100).map(|_| {
        let mut c = conn.clone();
        let key = key.clone();
        async move { redis::cmd("INCR").arg(&key).query_async::<i64>(&mut c).await }
    });
    for r in join_all(incrs).await {
        r.expect("incr");
    }
    let mut c = conn.clone();
    let v: i64 = redis::cmd("GET").arg(&key).query_async(&mut c).await.expect("get");
    assert_eq!(v, 100, "INCR is atomic under concurrent use");
    let _: () = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(1000)
        .query_async(&mut c)
        .await
        .expect("expire");
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut c).await.expect("ttl");
    assert!(ttl > 0 && ttl <= 1000);
}

#[actix_web::test]
async fn mongodb_wire_protocol_through_the_mongodb_crate() {
    use mongodb::bson::{doc, Document};
    let Some(url) = service_url("MONGODB_URL") else {
        return;
    };
    let client = mongodb::Client::with_uri_str(&url).await.expect("connect");
    let db = client.database(&format!("smoke_{}", Uuid::new_v4().simple()));
    let coll = db.collection::<Document>("chunks");
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! {"key": 1})
            .options(mongodb::options::IndexOptions::builder().unique(true).build())
            .build(),
    )
    .await
    .expect("unique index");
    let writes = (0..40).map(|i| {
        let coll = coll.clone();
        async move {
            coll.insert_one(doc! {"key": i, "text": format!("chunk {i}"), "vec": [0.1_f64, 0.2, i as f64]})
                .await
        }
    });
    for r in join_all(writes).await {
        r.expect("insert");
    }
    let found = coll.find_one(doc! {"key": 7}).await.expect("find").expect("document");
    assert_eq!(found.get_str("text").expect("text"), "chunk 7");
    assert_eq!(coll.count_documents(doc! {}).await.expect("count"), 40);
    let dup = coll.insert_one(doc! {"key": 7}).await;
    assert!(dup.is_err(), "the unique index holds");
    db.drop().await.expect("drop");
}

#[actix_web::test]
async fn cql_through_the_scylla_crate() {
    use scylla::client::session_builder::SessionBuilder;
    let Some(url) = service_url("SCYLLA_URL") else {
        return;
    };
    let session = SessionBuilder::new().known_node(&url).build().await.expect("connect");
    let ks = format!("smoke_{}", Uuid::new_v4().simple());
    session
        .query_unpaged(
            format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"),
            &[],
        )
        .await
        .expect("keyspace");
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {ks}.messages (user_id uuid, session_id uuid, at timeuuid, body text, \
                     PRIMARY KEY ((user_id, session_id), at)) WITH CLUSTERING ORDER BY (at ASC)"
            ),
            &[],
        )
        .await
        .expect("table");
    let insert = session
        .prepare(format!(
            "INSERT INTO {ks}.messages (user_id, session_id, at, body) VALUES (?, ?, now(), ?)"
        ))
        .await
        .expect("prepare");
    let (user, conv) = (Uuid::new_v4(), Uuid::new_v4());
    let writes = (0..30).map(|i| {
        let (session, insert) = (&session, &insert);
        async move { session.execute_unpaged(insert, (user, conv, format!("turn {i}"))).await }
    });
    for r in join_all(writes).await {
        r.expect("insert");
    }
    let rows = session
        .query_unpaged(
            format!("SELECT body FROM {ks}.messages WHERE user_id = ? AND session_id = ?"),
            (user, conv),
        )
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows");
    let bodies: Vec<String> = rows
        .rows::<(String,)>()
        .expect("typed rows")
        .map(|r| r.expect("row").0)
        .collect();
    assert_eq!(bodies.len(), 30);
    assert!(bodies.contains(&"turn 17".to_string()));
    session
        .query_unpaged(format!("DROP KEYSPACE {ks}"), &[])
        .await
        .expect("drop");
}
