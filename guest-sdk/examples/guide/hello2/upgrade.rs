use hello2::{Greeted, Hello};
use wraft_guest_sdk::testing::StoreHarness;

#[test]
fn upgrade_from_v1_counts_from_one() {
    // Version 1's real code, greeting two people.
    let mut v1 = StoreHarness::<hello::Hello>::new();
    v1.set_timestamp_ms(1_000);
    v1.apply(br#"{"name":"ann"}"#).unwrap();
    v1.apply(br#"{"name":"bob"}"#).unwrap();

    // What deploying version 2 over the tenant does: version 2 finds version 1's storage and
    // its migrate runs, from version 1.
    let mut v2 = v1.upgrade_to::<Hello>().expect("v2 migrates v1's records");
    let ann = Greeted {
        name: "ann".into(),
        since_ms: 1_000,
        times: 1,
    };
    let bob = Greeted {
        name: "bob".into(),
        since_ms: 1_000,
        times: 1,
    };
    assert_eq!(v2.query_typed(()).unwrap(), [ann, bob]);
    let again = v2.apply(br#"{"name":"ann"}"#).unwrap();
    assert_eq!(again, br#"{"greeting":"hello, ann","times":2}"#);

    // Deploying version 2 again (from version 2) leaves the records alone.
    let v2_again = v2.upgrade_to::<Hello>().expect("a redeploy");
    assert_eq!(*v2_again.store(), *v2.store());
}
