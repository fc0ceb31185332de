// Linked with a layer's objects and those of the layers below it, nothing else: the link fails on
// any symbol the layer takes from a layer above. It is never run.
int main() {
  return 0;
}
