use super::*;
use crate::readiness::SourceKind;
use idem_testkit::http::get_raw as get;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn serves_metrics_liveness_and_readiness() {
    let recorder = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        metrics::counter!("idem_test_total").increment(3);
    });
    let readiness = Readiness::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(recorder.handle(), readiness.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    for path in ["/metrics", "/anything"] {
        let ok = get(addr, path).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("idem_test_total 3"), "{ok}");
    }
    for path in ["/health", "/live"] {
        let live = get(addr, path).await;
        assert!(
            live.starts_with("HTTP/1.1 200") && live.ends_with("OK"),
            "{live}"
        );
    }
    let ready = get(addr, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains("application/json"), "{ready}");
    assert!(
        ready.ends_with(r#"{"ready":true,"reasons":[],"sources":[]}"#),
        "{ready}"
    );
    let down = readiness.register(SourceKind::Consumer, "c", || {
        vec!["broker connection down".into()]
    });
    let ready = get(addr, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(
        ready.contains(r#""reasons":["consumer c: broker connection down"]"#),
        "{ready}"
    );
    // Liveness does not depend on readiness.
    assert!(get(addr, "/live").await.starts_with("HTTP/1.1 200"));
    drop(down);
    assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
    server.abort();
}

#[tokio::test]
async fn one_listener_per_process_joined_at_its_address() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let busy = taken.local_addr().unwrap();
    let err = listen(busy).err().unwrap();
    assert!(matches!(err, Error::Metrics(_)), "{err}");
    assert!(err.to_string().contains(&busy.to_string()), "{err}");

    let first = listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = first.local_addr();
    let second = listen(addr).unwrap();
    let other = listen(busy).err().unwrap();
    assert!(other.to_string().contains(&addr.to_string()), "{other}");
    assert!(get(addr, "/live").await.starts_with("HTTP/1.1 200"));
    // The same recorder for whoever asks.
    install_recorder().unwrap();
    drop(first);
    assert!(
        get(addr, "/live").await.starts_with("HTTP/1.1 200"),
        "still one user"
    );
    drop(second);
    tokio::task::yield_now().await;
    let mut stopped = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stopped, "the listener stops with its last user");
    // And binds again later, with the recorder installed the first time.
    let again = listen("127.0.0.1:0".parse().unwrap()).unwrap();
    assert!(get(again.local_addr(), "/metrics")
        .await
        .starts_with("HTTP/1.1 200"));
}
