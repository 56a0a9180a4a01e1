use glommio::{LocalExecutorBuilder, Placement, net::TcpListener};
fn main() {
    let h = LocalExecutorBuilder::new(Placement::Unbound).spawn(|| async move {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        println!("bound {:?}", l.local_addr());
        glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
        println!("ok");
    }).unwrap();
    h.join().unwrap();
}
