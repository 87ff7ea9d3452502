// The CLI modules are declared here so that they compile and their unit tests run; the daemon's
// wiring (main) is the lead's.
#[allow(dead_code)]
mod cli;
#[allow(dead_code)]
mod keyval;
#[allow(dead_code)]
mod options;

fn main() {
    println!("ringblk: being written");
}
