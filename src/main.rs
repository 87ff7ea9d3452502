fn main() {
    println!("ringblk: being written");
}
