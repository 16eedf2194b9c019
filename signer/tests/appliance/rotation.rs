//! Rotation over the Admin API while a SPIRE server holds a `SubscribeToLocalBundle` stream: every bundle change
//! (publish, taint) reaches the stream exactly once and in order, a step that does not change the bundle sends
//! nothing, and refused steps answer with the right status and change nothing.

use signet_proto::signet::v1 as spb;
use signet_proto::signet::v1::admin_client::AdminClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as pb;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use tonic::Code;

use crate::support::bed::*;

fn step(step: &str, kind: &str, label: &str) -> spb::RotateRequest {
    spb::RotateRequest {
        step: step.into(),
        kind: kind.into(),
        label: label.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_steps_reach_subscribers_once_in_order() {
    let Some(bed) = Bed::start_with(|c| c.authority.rotation.schedule = false).await else {
        return;
    };
    let spire = bed.credential_for(SPIRE_A).await;
    let mut upstream = UpstreamAuthorityClient::new(bed.channel(Some(&spire)).await);
    let mut stream = upstream
        .subscribe_to_local_bundle(pb::SubscribeToLocalBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(first.upstream_x509_roots.len(), 1);
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    let seq0 = admin
        .get_rotation(spb::GetRotationRequest {})
        .await
        .unwrap()
        .into_inner()
        .bundle_sequence;

    // Bad input: an unknown step or kind, taint without a label, activate with nothing published.
    for (req, code) in [
        (step("rewind", "x509", ""), Code::InvalidArgument),
        (step("prepare", "rsa", ""), Code::InvalidArgument),
        (step("taint", "", ""), Code::InvalidArgument),
        (step("activate", "x509", ""), Code::FailedPrecondition),
        (step("destroy", "", "no-such-key"), Code::NotFound),
    ] {
        let e = admin.rotate(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e:?}");
        assert!(!e.message().is_empty());
    }
    // Only admins rotate.
    let mut not_admin = AdminClient::new(bed.channel(Some(&spire)).await);
    let e = not_admin
        .rotate(step("prepare", "x509", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // prepare: nothing reaches the stream.
    let r = admin
        .rotate(step("prepare", "x509", ""))
        .await
        .unwrap()
        .into_inner();
    let label = r.label.clone();
    // A step that changes nothing sends nothing: had prepare (or, below, the refused activate) sent a message, the
    // next one read would be it, and the checks of the following step's message would fail.
    // publish: one message with both roots, none tainted.
    admin.rotate(step("publish", "x509", "")).await.unwrap();
    let m = next(&mut stream).await;
    assert_eq!(m.upstream_x509_roots.len(), 2);
    assert!(m.upstream_x509_roots.iter().all(|r| !r.tainted));
    // activate too early: FAILED_PRECONDITION saying when; nothing reaches the stream.
    let e = admin
        .rotate(step("activate", "x509", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("allowed from"), "{}", e.message());
    // taint the new root: one message, the new root marked tainted (SPIRE re-mints at once).
    let r = admin
        .rotate(step("taint", "", &label))
        .await
        .unwrap()
        .into_inner();
    let m = next(&mut stream).await;
    let tainted: Vec<bool> = m.upstream_x509_roots.iter().map(|r| r.tainted).collect();
    assert_eq!(tainted, vec![false, true]);
    // The sequence went up once per change (one message a change: nothing more was sent).
    assert_eq!(r.rotation.unwrap().bundle_sequence, seq0 + 2);
    // Status lists the authorities from the datastore.
    let s = admin
        .get_status(spb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let states: Vec<(&str, &str, bool)> = s
        .authorities
        .iter()
        .map(|a| (a.kind.as_str(), a.state.as_str(), a.tainted))
        .collect();
    assert!(states.contains(&("x509", "published", true)), "{states:?}");
    assert!(states.contains(&("x509", "active", false)), "{states:?}");
}
